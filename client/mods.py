"""Flower mods around the site's ClientApp."""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.client.mod import secaggplus_mod
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedtune.federation.secagg_masks import install

from .secagg_policy import check_secagg_message
from .settings import settings_from_node_config

install()  # SecAgg+ masks from SHAKE-256 of the full seed, never Flower's 32-bit MT19937


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """SecAgg+ for train messages that run it, on the site's own terms (thresholds, neighbours,
    node lists, mask generator: client/secagg_policy.py). A train message without it is refused when the
    site requires secure aggregation (the default for a deployed site), so a coordinator cannot
    quietly downgrade a site to sending its update in the clear."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        # The site's own rules for the round first (client/secagg_policy.py), then Flower's protocol.
        check_secagg_message(msg.content, context.state.config_records, msg.metadata.dst_node_id,
                             settings_from_node_config(context.node_config).secagg_min_neighbours)
        return secaggplus_mod(msg, context, call_next)
    if msg.metadata.message_type == MessageType.TRAIN and settings_from_node_config(
        context.node_config
    ).require_secure_aggregation:
        raise PermissionError("this site requires secure aggregation (SecAgg+); the train message had none")
    return call_next(msg, context)


def private_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """The outermost mod: whatever fails at the site, the coordinator gets only a generic reason
    ("site-2: data error"); the full message stays in the site's log (client/replies.py).
    Flower would otherwise forward the exception's text, with the site's paths and values."""
    from fedtune.federation.refusal import INTERNAL_ERROR

    from .replies import SiteReplyError, log_failure, safe_site_id

    try:
        return call_next(msg, context)
    except SiteReplyError as exc:  # the client already logged it in full
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a generic reply
        site_id, folder = None, None
        try:
            settings = settings_from_node_config(context.node_config)
            site_id, folder = settings.site_id, settings.state_dir
        except Exception:  # noqa: BLE001 - a bad node config is itself only logged here
            pass
        try:
            reason = log_failure(site_id, exc, folder, what=str(msg.metadata.message_type))
        except Exception:  # noqa: BLE001 - logging the failure failed too: still only the generic words
            reason = f"{safe_site_id(site_id)}: {INTERNAL_ERROR}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
