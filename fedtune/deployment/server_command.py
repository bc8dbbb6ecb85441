"""``fedtune server`` and ``fedtune submit``: a Flower SuperLink with TLS and SuperNode
authentication, the sites' keys registered with it, and fedtune's run submitted with `flwr run`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import processes
from .certs import CertPaths
from .flower import (
    DeploymentError, flower_env, flwr_home, register_site_key, submit_command, superlink_command,
    wait_for_port, write_connection, write_flower_app,
)

log = logging.getLogger("fedtune.deployment")

INSECURE_WARNING = (
    "WARNING: --insecure: the coordinator runs WITHOUT TLS and WITHOUT site authentication. Anyone "
    "on the network can read the traffic and join as a site. Use this only for a local trial."
)


@dataclass
class ServerOptions:
    certs: Optional[Path]
    site_keys: Optional[Path] = None   # folder of sites' *.pub to register (default: CERTS/sites)
    host: str = "127.0.0.1"
    port: int = 9092
    state_dir: Path = Path.home() / ".fedtune" / "coordinator"
    connection: str = "fedtune"
    insecure: bool = False
    config: Optional[Path] = None      # a run to submit once the SuperLink is up
    out: Optional[Path] = None
    resume: bool = False
    keep_running: bool = False
    startup_timeout: float = 60.0
    overrides: list = None             # --set KEY=VALUE for the run (with resume: RESUMABLE keys only)
    verbose: bool = False              # Flower's own log lines on the console too


def _local_address(opts: ServerOptions) -> str:
    # The operator's own `flwr` commands reach the SuperLink on this machine.
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
    return f"{host}:{opts.port}"


def serve(opts: ServerOptions) -> int:
    """Start the SuperLink, register the sites, optionally run one federated run to its end."""
    certs = CertPaths(opts.certs) if opts.certs is not None else None
    state = opts.state_dir.expanduser()
    state.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(certs, opts.host, opts.port, state / "superlink.db", opts.insecure)
    if opts.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    env = flower_env()
    if opts.config is not None:  # a bad run config fails now, not after the sites have connected
        if opts.out is None:
            raise DeploymentError("--config needs --out (the run directory on this machine)")
        check_run_config(opts.config, opts.overrides, opts.out if opts.resume else None)
    # With a run: the run folder's logs/; serving only: the state folder's logs/.
    log_path = (Path(opts.out) if opts.config is not None else state) / "logs" / "superlink.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with processes.terminate_on_signals(), open(log_path, "ab") as superlink_log:
        # The SuperLink logs to the file; to the console too only with --verbose.
        superlink = processes.start(cmd, env, **({} if opts.verbose else
                                                  {"stdout": superlink_log, "stderr": subprocess.STDOUT}))
        try:
            host, port = _local_address(opts).rsplit(":", 1)
            wait_for_port(host, int(port), opts.startup_timeout, superlink)
            home = flwr_home(env)
            write_connection(opts.connection, _local_address(opts), None if opts.insecure else certs.ca_cert, home)
            print(f"fedtune server: SuperLink on {opts.host}:{opts.port} "
                  f"({'INSECURE' if opts.insecure else 'TLS, site authentication on'}); "
                  f"`flwr` connection '{opts.connection}' in {home / 'config.toml'}", flush=True)
            if not opts.insecure:
                register_sites(Path(opts.site_keys) if opts.site_keys else certs.sites, opts.connection, env)
            print(f"fedtune server: SuperLink log: {log_path}", flush=True)
            if opts.config is None:
                print("fedtune server: waiting for runs (`fedtune submit` or `flwr run`); Ctrl-C stops", flush=True)
                return superlink.wait()
            rc = submit(opts.config, opts.out, opts.connection, state, opts.resume, env, opts.overrides,
                        verbose=opts.verbose)
            if opts.keep_running:
                print("fedtune server: run finished; still serving (Ctrl-C stops)", flush=True)
                superlink.wait()
            return rc
        except KeyboardInterrupt:
            print("fedtune server: stopping", file=sys.stderr)
            return 130
        finally:
            processes.stop(superlink)


def check_run_config(path: Path, overrides: Optional[list] = None, resume_dir: Optional[Path] = None):
    """What the ServerApp will need, checked before any site is kept waiting; returns the config."""
    from fedtune.config import load_config

    if resume_dir is not None:  # the saved run's config with the overrides
        from fedtune.server.coordinator import resumed_config

        cfg = resumed_config(Path(resume_dir), list(overrides or []))
        path = Path(resume_dir) / "config.toml"
    else:
        cfg = load_config(path, list(overrides or []))  # raises a ConfigError naming the file and key
    if cfg.data.eval is None or not Path(cfg.data.eval).is_file():
        raise DeploymentError(f"{path}: data.eval = {cfg.data.eval}: the coordinator's own evaluation file "
                              "is missing (sites bring their data; the coordinator evaluates on this one)")
    return cfg


def register_sites(folder: Path, connection: str, env: dict) -> dict[str, str]:
    keys = sorted(folder.glob("*.pub")) if folder.is_dir() else []
    if not keys:
        print(f"fedtune server: no site keys in {folder}: add them with `fedtune certs site NAME` "
              "(or `flwr supernode register`)", flush=True)
    status = {}
    for key in keys:
        status[key.stem] = register_site_key(key, connection, env)
        print(f"fedtune server: site {key.stem}: {status[key.stem]}", flush=True)
    return status


def submit(config: Path, out: Path, connection: str, state_dir: Path, resume: bool = False,
           env: Optional[dict] = None, overrides: Optional[list] = None, verbose: bool = False) -> int:
    """`flwr run` of fedtune's app with this run config: the run's header, progress and one line
    per round on the console (read from the run folder as the ServerApp writes it), the run's
    Flower log in ``<out>/logs/serverapp.log`` (and on the console with ``verbose``); then how
    it ended and the per-round summary."""
    from fedtune.console import RunView

    cfg = check_run_config(config, overrides, out if resume else None)
    overrides_file = None
    if overrides:  # read by the ServerApp on this machine
        overrides_file = Path(out).resolve() / "overrides.json"
        from fedtune.io_utils import atomic_write_json

        atomic_write_json(overrides_file, list(overrides))
    env = env or flower_env()
    app_dir = write_flower_app(Path(state_dir).expanduser() / "app")
    out = Path(out)
    (out / "run.json").unlink(missing_ok=True)  # so a stale one is never reported
    log_path = out / "logs" / "serverapp.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as stream_log, RunView(cfg, out, "server"):
        result = subprocess.run(submit_command(app_dir, connection, config, out, resume, overrides=overrides_file),
                                env=env, **({} if verbose else {"stdout": stream_log, "stderr": subprocess.STDOUT}))
    return report(out, result.returncode, log_path)


def report(out: Path, flwr_rc: int, log_path: Optional[Path] = None) -> int:
    status = out / "run.json"
    if not status.exists():
        where = f"see {log_path}" if log_path else "see the log above"
        print(f"fedtune: the run did not finish (flwr run exited with {flwr_rc}); {where}", file=sys.stderr)
        if log_path is not None and log_path.is_file():
            for line in log_path.read_text(errors="replace").splitlines()[-12:]:
                print(f"  {line}", file=sys.stderr)
        return flwr_rc or 1
    ended = json.loads(status.read_text())["ended"]
    from fedtune.console import print_outcome

    print_outcome(out, ended, "run")
    if ended == "interrupted":
        return 3
    return 4 if ended.startswith("stopped") else 0  # stopped: too few sites, or no round aggregated
