"""Marks a site's budget refusal in its error reply, so the coordinator leaves the site out for
the rest of the run (a refusal is final) instead of retrying it as a transient failure."""

from __future__ import annotations

from flwr.app import Context, Message

from fedtune.federation.refusal import BUDGET_REFUSAL_MARK


def refusal_mark_mod(msg: Message, context: Context, call_next) -> Message:
    try:
        return call_next(msg, context)
    except Exception as exc:
        if type(exc).__name__ == "BudgetRefusal" and BUDGET_REFUSAL_MARK not in str(exc):
            raise type(exc)(f"{BUDGET_REFUSAL_MARK} {_site(context)}: {exc}") from exc
        raise


def _site(context: Context) -> str:
    from .settings import settings_from_node_config

    try:
        return settings_from_node_config(context.node_config).site_id
    except Exception:  # the refusal matters more than the name
        return "site"
