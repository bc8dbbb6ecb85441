"""The ClientApp a site runs (Flower App component ``client.app:app``).

In a deployment Flower starts a fresh ClientApp process for every message, and SecAgg+ sends
four train messages per round of which only one trains. So this module imports only Flower:
torch, transformers and the site's model are loaded inside ``client_fn``, which Flower calls
only for the messages that train or evaluate.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import ClientApp

from .mods import private_errors_mod, secure_aggregation_mod
from .preflight import preflight_mod
from .traffic import traffic_mod
from .settings import settings_from_node_config


def client_fn(context: Context):
    from .agent import SiteClient  # heavy: torch, transformers, peft, opacus

    return SiteClient(settings_from_node_config(context.node_config)).to_client()


def make_client_app(extra_mods: list | None = None) -> ClientApp:
    """``extra_mods`` run outside secure aggregation and outside ``private_errors_mod`` (which
    turns every failure into a generic reply), so they see exactly what leaves the site;
    ``traffic_mod`` (outermost) counts what the site sends for its own console."""
    mods = [traffic_mod, *(extra_mods or []), private_errors_mod, preflight_mod, secure_aggregation_mod]
    return ClientApp(client_fn=client_fn, mods=mods)


app = make_client_app()
