"""The ServerApp the coordinator runs (Flower App component ``server.app:app`` from a checkout,
``fedtune.server.app:app`` from an installation), for ``flwr run`` against a local simulation
or a deployed SuperLink.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, or ``--run-config``):
``config`` (the fedtune TOML: absolute, or relative to the app folder), ``out`` (the run
directory), ``mode`` (``simulation``: split the config's dataset across the simulated sites;
``deployment``: sites hold their own data), ``resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.server import Grid, ServerApp

from fedtune.config import ConfigError, load_config
from fedtune.io_utils import atomic_write_json

from .coordinator import execute_run, prepare_run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if not str(rc.get("config", "")):
        raise ConfigError("run config `config` is empty: pass --run-config 'config=\"/abs/path/run.toml\"'")
    config_path = Path(str(rc["config"])).expanduser()
    if not config_path.is_absolute():
        config_path = Path(__file__).resolve().parents[1] / config_path
    overrides = []
    if str(rc.get("overrides", "")):  # a JSON list of KEY=VALUE written by `fedtune submit`
        overrides = json.loads(Path(str(rc["overrides"])).read_text())
    resume = bool(rc.get("resume", False))
    cfg = None if resume else load_config(config_path, overrides)
    out = Path(str(rc.get("out", "runs/flwr-run"))).expanduser().resolve()
    run = prepare_run(cfg, out, resume=resume, simulated=str(rc.get("mode", "simulation")) == "simulation",
                      overrides=overrides)
    ended = execute_run(grid, context, run)
    # How the run ended, for whoever submitted it (`fedtune server` reads it).
    atomic_write_json(out / "run.json", {"run_id": run.run_id, "ended": ended})
