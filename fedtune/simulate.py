"""``fedtune simulate``: a whole federation on one machine, on Flower's simulation engine (Ray)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from fedtune.config import FedTuneConfig

log = logging.getLogger(__name__)


def simulate(
    cfg: FedTuneConfig,
    out_dir: Path,
    resume: bool = False,
    client_mods: Optional[list] = None,
    stop_after_round: Optional[int] = None,
    cpus: Optional[int] = None,
) -> str:
    """Validate (before any round), then run the rounds; returns how the run ended."""
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app
    from fedtune.server.coordinator import execute_run, prepare_run

    run = prepare_run(cfg, Path(out_dir), resume=resume, simulated=True)
    _log_site_plans(run.cfg)
    outcome: dict[str, str] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        outcome["ended"] = execute_run(grid, context, run, stop_after_round)

    cpus = cpus or os.cpu_count() or 2
    # Flower adds the working directory to PYTHONPATH on each call; keep it from growing.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(client_mods),
            num_supernodes=run.cfg.federation.sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": True},
            },
        )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if "ended" not in outcome:
        raise RuntimeError("the federated run did not finish; see the log above")
    return outcome["ended"]


def _log_site_plans(cfg: FedTuneConfig) -> None:
    """The run header: what each simulated site will use (``auto`` resolved), its noise and
    noise-to-signal per step, and a warning for a site too small to learn under DP."""
    if not cfg.privacy.enabled:
        return
    from fedtune.privacy.plan import format_plans, plan_sites, simulated_site_sizes

    plans = plan_sites(cfg, simulated_site_sizes(cfg))
    log.info("privacy plan per site:\n%s", format_plans([p.model_copy(update={"warnings": []}) for p in plans]))
    for plan in plans:
        for warning in plan.warnings:
            log.warning("%s", warning)
