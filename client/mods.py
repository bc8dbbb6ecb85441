"""Flower mods around the site's ClientApp."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from .settings import settings_from_node_config


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """SecAgg+ for train messages that run it. A train message without it is refused when the
    site requires secure aggregation (the default for a deployed site), so a coordinator cannot
    quietly downgrade a site to sending its update in the clear."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    if msg.metadata.message_type == MessageType.TRAIN and settings_from_node_config(
        context.node_config
    ).require_secure_aggregation:
        raise PermissionError("this site requires secure aggregation (SecAgg+); the train message had none")
    return call_next(msg, context)
