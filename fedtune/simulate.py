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
    resume_overrides: Optional[list[str]] = None,
) -> str:
    """Validate (before any round), then run the rounds; returns how the run ended."""
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app
    from fedtune.server.coordinator import execute_run, prepare_run

    run = prepare_run(cfg, Path(out_dir), resume=resume, simulated=True, overrides=resume_overrides)
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
