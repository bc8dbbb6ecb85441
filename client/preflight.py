"""The site's side of the pre-flight (fedtune.federation.preflight): a Flower mod that answers
the coordinator's query message before any model is loaded."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fedtune.federation.preflight import RECORD, PreflightRequest, check_site

from .settings import settings_from_node_config


def preflight_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type == MessageType.QUERY and RECORD in msg.content.config_records:
        request = PreflightRequest.from_record(msg.content.config_records[RECORD])
        reply = check_site(request, settings_from_node_config(context.node_config))
        return Message(RecordDict({RECORD: ConfigRecord(reply.to_record())}), reply_to=msg)
    return call_next(msg, context)
