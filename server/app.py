"""The ServerApp the coordinator runs (Flower App component ``server.app:app``), for
``flwr run`` against a local simulation or a deployed SuperLink.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, or ``--run-config``):
``config`` (the fedtune TOML, relative to the app folder), ``out`` (the run directory),
``mode`` (``simulation``: split the config's dataset across the simulated sites;
``deployment``: sites hold their own data), ``resume``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.server import Grid, ServerApp

from fedtune.config import load_config

from .coordinator import execute_run, prepare_run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    config_path = Path(str(rc.get("config", "simulations/federated.toml")))
    if not config_path.is_absolute():
        config_path = Path(__file__).resolve().parents[1] / config_path
    cfg = load_config(config_path)
    run = prepare_run(cfg, Path(str(rc.get("out", "runs/flwr-run"))).expanduser().resolve(),
                      resume=bool(rc.get("resume", False)), simulated=str(rc.get("mode", "simulation")) == "simulation")
    execute_run(grid, context, run)
