"""The site's side of the pre-flight (fedtune.federation.preflight): a Flower mod that answers
the coordinator's query message before any model is loaded."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fedtune import __version__
from fedtune.federation.preflight import RECORD, PreflightReply, PreflightRequest, check_site

from .settings import settings_from_node_config


def preflight_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type == MessageType.QUERY and RECORD in msg.content.config_records:
        return Message(RecordDict({RECORD: ConfigRecord(_answer(msg, context).to_record())}), reply_to=msg)
    return call_next(msg, context)


def _answer(msg: Message, context: Context) -> PreflightReply:
    """The site's pre-flight reply. A check that fails unexpectedly is a "not ready" with only the
    generic kind of failure as its reason ("internal error"): the coordinator learns which site
    failed its pre-flight, the site's log holds the traceback (client/replies.py)."""
    from .replies import failure_kind, log_failure, safe_site_id

    site_id, folder = None, None
    try:
        settings = settings_from_node_config(context.node_config)
        site_id, folder = settings.site_id, settings.state_dir
        return check_site(PreflightRequest.from_record(msg.content.config_records[RECORD]), settings)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a generic reply
        log_failure(site_id, exc, folder, what="pre-flight")
        return PreflightReply(site=safe_site_id(site_id), ready=False, reason=failure_kind(exc), version=__version__)
