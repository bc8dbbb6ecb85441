"""``fedtune simulate``: a whole federation on one machine, on Flower's simulation engine (Ray)."""

from __future__ import annotations

import logging
import os
import sys
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
    verbose: bool = False,
    site_env: Optional[dict[str, str]] = None,
) -> str:
    """Validate (before any round), then run the rounds; returns how the run ended.

    The sites' Ray workers write their logs, warnings and output to ``<out_dir>/logs/sites.log``
    (and, with ``verbose``, to this console as well).

    Flower 1.42 deprecates ``run_simulation`` in favour of ``flwr run`` with a local SuperLink
    (tested in tests/test_federation.py::test_flwr_run_on_the_flower_app). fedtune keeps the
    in-process call: the run stays one process tree that Ctrl-C stops, the coordinator's errors
    surface here as exceptions, and tests can add client mods (the egress check) and stop after a
    round. Its deprecation notice goes to the log file with Flower's other lines.
    """
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app
    from fedtune.server.coordinator import execute_run, prepare_run

    run = prepare_run(cfg, Path(out_dir), resume=resume, simulated=True, overrides=resume_overrides)
    _log_site_plans(run.cfg)
    outcome: dict[str, str] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        outcome["ended"] = execute_run(grid, context, run, stop_after_round)

    cpus = cpus or os.cpu_count() or 2
    # Flower adds the working directory to PYTHONPATH on each call; keep it from growing.
    pythonpath = os.environ.get("PYTHONPATH")
    started_ray = _start_ray(cpus, Path(out_dir) / "logs" / "sites.log", verbose, site_env or {})
    try:
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(client_mods),
            num_supernodes=run.cfg.federation.sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": verbose},
            },
        )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
        if started_ray:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    if "ended" not in outcome:
        raise RuntimeError(f"the federated run did not finish; see {Path(out_dir) / 'logs'}")
    return outcome["ended"]


def _start_ray(cpus: int, site_log: Path, verbose: bool, site_env: dict[str, str]) -> bool:
    """Start Ray before Flower does (Flower then uses it), so that each site worker runs
    ``fedtune.run_logs.worker_setup`` first: its logs and warnings go to ``site_log``, and its
    output reaches this console only with ``verbose``. Returns whether Ray was started here."""
    import ray

    from fedtune.run_logs import WORKER_LOG_ENV, WORKER_VERBOSE_ENV

    if ray.is_initialized():
        if site_env:  # the running Ray's workers would never see them (an audit without its canaries)
            raise RuntimeError("Ray is already running in this process: its site workers cannot get "
                               f"{', '.join(site_env)}; run this in a fresh process")
        return False
    site_log.parent.mkdir(parents=True, exist_ok=True)
    # What Flower's own Ray start passes: the workers import the ClientApp from this sys.path.
    paths = [*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(
        num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=verbose,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], WORKER_LOG_ENV: str(site_log.resolve()),
                         WORKER_VERBOSE_ENV: "1" if verbose else "0", **site_env},
            "worker_process_setup_hook": "fedtune.run_logs.worker_setup",
        },
    )
    return True


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
