"""Thin wrappers over Flower's own commands: ``flower-superlink``, ``flower-supernode`` and
``flwr`` (run, supernode register). Everything here builds a command line or a file those
commands read; none of it speaks Flower's protocol itself."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Optional

import tomli_w

from fedtune import __version__

from .certs import CertPaths

FLOWER_VERSION = "1.42.0"


OBJECT_BACKOFF_SECONDS = 0.05  # Flower 1.42's first retry of a message object not yet there: 1 s


def fast_object_pulls(module) -> None:
    """Flower's ``pull_objects`` as ``module`` calls it (the SuperNode loop, the coordinator's
    grid), with its first retry after ``OBJECT_BACKOFF_SECONDS`` instead of 1 s, still doubling
    to Flower's own cap (10 s) and tries. A message is announced before its objects have all
    arrived, so the first pull of a reply or of a new message often finds one missing, and every
    exchange waited a whole second for it. (A cap of 0.2 s was tried on 2026-12-07: the tiny
    deploy_vs_sim steady round went from 11.31 s to 11.17 s, within noise, and the deployment
    tests ran slower in CI, so the cap stays Flower's.)"""
    from functools import partial

    from flwr.supercore.inflatable import inflatable_utils

    if getattr(module.pull_objects, "fedtune_paced", False):
        return
    paced = partial(inflatable_utils.pull_objects, initial_backoff=OBJECT_BACKOFF_SECONDS)
    paced.fedtune_paced = True
    module.pull_objects = paced


class DeploymentError(RuntimeError):
    """A coordinator or site agent that cannot start as asked (the message says why)."""


def flower_bin(name: str) -> str:
    """Flower's console scripts from this environment (a venv need not be on PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"`{name}` not found: install fedtune (it brings flwr {FLOWER_VERSION})")
    return found


def flower_env(flwr_home: Optional[Path] = None) -> dict[str, str]:
    """The environment for Flower's processes: this venv's scripts first on PATH (SuperLink and
    SuperNode start `flwr-serverapp` / `flwr-clientapp` from PATH), no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flwr_home(env: Optional[dict] = None) -> Path:
    env = env if env is not None else os.environ
    return Path(env.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


# -- the coordinator --------------------------------------------------------------------------

def superlink_command(certs: Optional[CertPaths], host: str, port: int, database: Path,
                      insecure: bool = False) -> list[str]:
    """TLS and SuperNode authentication on; plain text only when asked for."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(database), "--disable-runtime-dependency-installation"]
    if insecure:
        return [*cmd, "--insecure"]
    if certs is None:
        raise DeploymentError("the coordinator needs --certs (from `fedtune certs init`), or --insecure")
    for path in (certs.ca_cert, certs.server_cert, certs.server_key):
        if not path.is_file():
            raise DeploymentError(f"{path} is missing: create it with `fedtune certs init --dir {certs.root}`")
    return [*cmd, "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]


def write_connection(name: str, address: str, ca_cert: Optional[Path], home: Path, default: bool = True) -> Path:
    """Add (or update) a SuperLink connection in Flower's $FLWR_HOME/config.toml, keeping the
    rest of the file, so `flwr run/ls/log/stop/supernode` reach this coordinator by name."""
    path = home / "config.toml"
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = data.setdefault("superlink", {})
    entry: dict = {"address": address}
    if ca_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca_cert).resolve())
    superlink[name] = entry
    if default:
        superlink["default"] = name
    home.mkdir(parents=True, exist_ok=True)
    from fedtune.io_utils import atomic_write_text

    atomic_write_text(path, tomli_w.dumps(data))
    return path


def wait_for_port(host: str, port: int, timeout: float, process: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with code {process.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def register_site_key(public_key: Path, connection: str, env: dict) -> str:
    """`flwr supernode register`: returns 'registered' or 'already registered'."""
    result = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), connection],
                            env=env, capture_output=True, text=True)
    text = result.stdout + result.stderr
    if result.returncode == 0:
        return "registered"
    if "already in use" in text:
        return "already registered"
    raise DeploymentError(f"registering {public_key} failed: {text.strip()}")


def app_manifest(version: str = __version__) -> dict:
    """The ``pyproject.toml`` of fedtune's Flower App: components that name the installed
    fedtune.server / fedtune.client, and no code. A site runs a run only when its bundle is this
    manifest (client/approval.py), whatever code a bundle carries."""
    return {
        "project": {
            "name": "fedtune-app", "version": version, "license": "Apache-2.0",
            "description": "fedtune's ServerApp and ClientApp (installed package)",
            "dependencies": [f"flwr[simulation]=={FLOWER_VERSION}", f"fedtune=={version}"],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"},
            "config": {"config": "", "out": "runs/flwr-run", "mode": "deployment", "resume": False,
                       "overrides": ""},
        }}},
    }


def write_flower_app(folder: Path) -> Path:
    """fedtune's Flower App (:func:`app_manifest`), for `flwr run` from any installation. The
    bundle carries no code; each site checks that a run's bundle is exactly this before it
    answers, and runs the fedtune it installed (client/site_worker.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(app_manifest()))
    return folder


def run_config_arg(config: Path, out: Path, resume: bool = False, overrides: Optional[Path] = None) -> str:
    """Absolute paths: the ServerApp runs on the coordinator, in another working directory.
    ``overrides``: a JSON file with the run's --set KEY=VALUE list."""
    arg = (f'config="{Path(config).resolve()}" out="{Path(out).resolve()}" mode="deployment" '
           f'resume={"true" if resume else "false"}')
    return arg + (f' overrides="{Path(overrides).resolve()}"' if overrides else "")


def submit_command(app_dir: Path, connection: str, config: Path, out: Path, resume: bool = False,
                   stream: bool = True, overrides: Optional[Path] = None) -> list[str]:
    cmd = [flower_bin("flwr"), "run", str(app_dir), connection, "--run-config",
           run_config_arg(config, out, resume, overrides)]
    return [*cmd, "--stream"] if stream else cmd


# -- a site agent -----------------------------------------------------------------------------

def supernode_command(superlink: str, node_config: Path, runtime_port: int, ca_cert: Optional[Path],
                      private_key: Optional[Path], insecure: bool = False, max_retries: Optional[int] = None,
                      max_wait_time: Optional[float] = None, secret_file: Optional[Path] = None,
                      heartbeat_interval: Optional[float] = None) -> list[str]:
    """The site's SuperNode, with Flower's fixed waits shortened (supernode_pace.py). Its Runtime
    API listens on this machine's loopback only. ``--isolation process``: the SuperNode starts no
    process for a message; the site's own long-lived worker (client/site_worker.py) claims each
    task with the SuperExec auth secret in ``secret_file``, which is mandatory."""
    if secret_file is None or not Path(secret_file).is_file():
        raise DeploymentError("a site's SuperNode needs its SuperExec auth secret file (the site agent creates it)")
    cmd = [sys.executable, "-m", "fedtune.deployment.supernode_pace", "--superlink", superlink,
           "--node-config", str(node_config), "--host", "127.0.0.1", "--port", str(runtime_port),
           "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    if heartbeat_interval is not None:  # supernode_pace's own option (Flower's is fixed at 30 s)
        cmd += ["--heartbeat-interval", str(heartbeat_interval)]
    if insecure:
        return [*cmd, "--insecure"]
    if ca_cert is None or private_key is None:
        raise DeploymentError("a site agent needs --ca (the federation's ca.crt) and --key (the site's "
                              "private key from `fedtune certs`), or --insecure")
    for path in (ca_cert, private_key):
        if not Path(path).is_file():
            raise DeploymentError(f"{path} does not exist")
    return [*cmd, "--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(private_key)]


def check_tls(host: str, port: int, ca_cert: Path, server_name: Optional[str] = None, timeout: float = 5) -> None:
    """A TLS handshake that verifies the coordinator's certificate against the CA and the host
    name, as a site does: raises ssl.SSLCertVerificationError when it would be rejected."""
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name or host):
            pass
