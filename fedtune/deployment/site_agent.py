"""``fedtune client``: a site agent, i.e. a Flower SuperNode that connects over TLS with the
site's private key and hands the site's settings to fedtune's ClientApp as node config."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tomli_w
from pydantic import ValidationError

from fedtune.io_utils import atomic_write_text

from . import processes
from .flower import DeploymentError, flower_env, supernode_command
from .site_view import SiteRoundView

INSECURE_WARNING = (
    "WARNING: --insecure: this site agent connects WITHOUT TLS and WITHOUT authenticating itself. "
    "Its (masked) updates and the global adapter travel in plain text. Use this only for a local trial."
)


@dataclass
class ClientOptions:
    superlink: str
    ca: Optional[Path] = None
    key: Optional[Path] = None
    settings_file: Optional[Path] = None
    settings: dict = field(default_factory=dict)   # node-config keys from the command line
    runtime_port: int = 9094
    insecure: bool = False
    max_retries: Optional[int] = None
    max_wait_time: Optional[float] = None
    verbose: bool = False          # the SuperNode's own log on the console too


def site_settings(opts: ClientOptions):
    """The site's settings: its settings file, then command-line flags; checked here, at start,
    so a typo is reported now and not at the first round."""
    from fedtune.client.settings import SiteSettings

    raw: dict = {}
    if opts.settings_file is not None:
        try:
            raw.update(tomllib.loads(Path(opts.settings_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DeploymentError(f"--settings {opts.settings_file}: {exc}") from None
    raw.update({k: v for k, v in opts.settings.items() if v is not None})
    if "data-path" not in raw:
        raise DeploymentError("the site agent needs --data (or data-path in --settings): the site's data file")
    if "site-id" not in raw:
        raw["site-id"] = Path(opts.key).stem if opts.key is not None else Path(str(raw["data-path"])).stem
    raw["data-path"] = str(Path(str(raw["data-path"])).expanduser().resolve())
    raw.setdefault("state-dir", str(Path.home() / ".fedtune" / "sites" / str(raw["site-id"])))
    try:
        settings = SiteSettings.model_validate(raw)
    except ValidationError as exc:
        where = f" in {opts.settings_file}" if opts.settings_file else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DeploymentError(f"site settings{where}: {problems}") from None
    _check_data(settings)
    return settings


def _check_data(settings) -> None:
    from fedtune.data.readers import read_table

    path = settings.data_path
    if not path.is_file():
        raise DeploymentError(f"data-path {path}: no such file")
    read_table(path, settings.data_format)  # raises a DataError naming the file and row


def _check_key(key: Path) -> None:
    mode = key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"WARNING: {key} is readable by other users (mode {stat.filemode(mode)}): chmod 600 it",
              file=sys.stderr)


def node_config_file(settings, state_dir: Path) -> Path:
    """Flower reads a node config from a TOML file: no quoting trouble with paths and spaces."""
    values = {k: (str(v) if isinstance(v, Path) else v)
              for k, v in settings.model_dump(by_alias=True, exclude_none=True).items()}
    path = state_dir / "node-config.toml"
    atomic_write_text(path, tomli_w.dumps(values))
    return path


def site_env(state: Path) -> dict[str, str]:
    """The SuperNode's environment: fedtune's own ``flwr-clientapp`` first on PATH, so every
    message is answered by the fedtune installed here, never by code from a run's bundle
    (client/site_process.py)."""
    from fedtune.client.site_process import install_launcher

    env = flower_env()
    env["PATH"] = f"{install_launcher(state)}{os.pathsep}{env['PATH']}"
    return env


def _policy_line(settings) -> str:
    from fedtune.client.policy import SitePolicy

    return SitePolicy(**{k: getattr(settings, k) for k in SitePolicy.model_fields}).describe()


def run_agent(opts: ClientOptions) -> int:
    settings = site_settings(opts)
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if opts.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    elif opts.key is not None and Path(opts.key).is_file():
        _check_key(Path(opts.key))
    cmd = supernode_command(opts.superlink, node_config_file(settings, state), opts.runtime_port, opts.ca, opts.key,
                            opts.insecure, opts.max_retries, opts.max_wait_time)
    log_path = state / "logs" / "supernode.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"fedtune client: site '{settings.site_id}' -> {opts.superlink} "
          f"({'INSECURE' if opts.insecure else 'TLS, authenticated'}); data {settings.data_path}; "
          f"privacy ledger in {state}; Flower's log in {log_path}", flush=True)
    print(f"fedtune client: privacy (this site's own, whatever a run config asks): {_policy_line(settings)}; "
          f"dataset '{settings.dataset_name}'", flush=True)
    view = SiteRoundView(settings.site_id, state).start()
    with processes.terminate_on_signals(), open(log_path, "ab") as flower_log:
        # Flower's SuperNode (and its ClientApps) log to the file; with --verbose to the console too.
        output = {} if opts.verbose else {"stdout": flower_log, "stderr": subprocess.STDOUT}
        supernode = processes.start(cmd, site_env(state), **output)
        rc = 130
        try:
            rc = supernode.wait()
            return rc
        except KeyboardInterrupt:
            print("fedtune client: stopping", file=sys.stderr)
            return 130
        finally:
            processes.stop(supernode)
            view.stop()
            if rc not in (0, 130) and not opts.verbose:
                _print_tail(log_path, rc)


def _print_tail(log_path: Path, rc: int, lines: int = 12) -> None:
    """Why the SuperNode stopped: the end of its log, which the console did not show."""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    print(f"fedtune client: the SuperNode exited with code {rc}; the end of {log_path}:", file=sys.stderr)
    for line in tail:
        print(f"  {line}", file=sys.stderr)
