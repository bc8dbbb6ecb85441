"""``fedtune client``: a site agent. It runs two processes and keeps them together:

- Flower's SuperNode (``--isolation process``, its fixed waits shortened: supernode_pace.py),
  which connects over TLS with the site's private key and holds the site's settings as node
  config;
- the site's long-lived worker (client/site_worker.py), which claims the SuperNode's tasks with
  a SuperExec auth secret created here for each start (mode 0600) and answers them with the
  fedtune installed here; restarted when it dies.

Both stop when the agent stops, on any signal, and neither outlives it (processes.py)."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
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
    heartbeat_interval: Optional[float] = None  # seconds; Flower's 30 when unset (supernode_pace.py)
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


SECRET_FILE = "superexec-auth.secret"
WORKER_RESTARTS = 5            # a worker that dies this often ...
WORKER_RESTART_WINDOW = 60.0   # ... within this many seconds stops the agent


def write_secret(state: Path) -> Path:
    """A fresh SuperExec auth secret for this start of the agent (32 random bytes, mode 0600):
    only the processes given it (the SuperNode and the site's worker) can claim the site's tasks."""
    path = state / SECRET_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    os.replace(tmp, path)
    return path


def worker_command(runtime_port: int, secret: Path) -> list[str]:
    """The site's long-lived worker (client/site_worker.py). ``-P``: the working directory is not
    put on ``sys.path``, so only the installed fedtune runs."""
    return [sys.executable, "-P", "-m", "fedtune.client.site_worker", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--secret-file", str(secret)]


class WorkerKeeper:
    """Starts the site's worker and starts it again when it dies; gives up when it keeps dying."""

    def __init__(self, cmd: list[str], env: dict, output: dict, clock=time.monotonic):
        self.cmd, self.env, self.output, self.clock = cmd, env, output, clock
        self.process: Optional[subprocess.Popen] = None
        self.starts: list[float] = []

    def start(self) -> None:
        self.process = processes.start(self.cmd, self.env, **self.output)
        self.starts.append(self.clock())

    def check(self) -> None:
        """Restart a worker that exited; raise DeploymentError when it died too often."""
        if self.process is None or self.process.poll() is None:
            return
        rc = self.process.returncode
        recent = [t for t in self.starts if self.clock() - t < WORKER_RESTART_WINDOW]
        if len(recent) >= WORKER_RESTARTS:
            raise DeploymentError(f"the site worker exited {len(recent)} times within {WORKER_RESTART_WINDOW:.0f} s "
                                  f"(last exit code {rc})")
        print(f"fedtune client: the site worker exited with code {rc}; starting it again", file=sys.stderr,
              flush=True)
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            processes.stop(self.process)


def _policy_line(settings) -> str:
    from fedtune.client.policy import SitePolicy

    return SitePolicy(**{k: getattr(settings, k) for k in SitePolicy.model_fields}).describe()


def _shares_line(settings) -> str:
    """What the site shares, for its admin: its pinned columns and declared labels; without
    declared labels, the labels its file holds (shown here only, never sent)."""
    line = (f"columns text={settings.text_column!r} label={settings.label_column!r} (generation: "
            f"prompt={settings.prompt_column!r} response={settings.response_column!r}); ")
    if settings.label_set is not None:
        return line + f"labels {', '.join(settings.label_set)}"
    from fedtune.data.readers import read_table

    table = read_table(settings.data_path, settings.data_format)
    held = ""
    if settings.label_column in table.columns:
        values = sorted({str(v) for v in table[settings.label_column].dropna()})
        held = f" (this file's {settings.label_column!r} column holds: {', '.join(values[:20])}" + (
            f", ... {len(values)} in all)" if len(values) > 20 else ")")
    return line + f"NO LABELS DECLARED: no classification run is answered until --labels names them{held}"


def run_agent(opts: ClientOptions) -> int:
    settings = site_settings(opts)
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if opts.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    elif opts.key is not None and Path(opts.key).is_file():
        _check_key(Path(opts.key))
    secret = write_secret(state)
    cmd = supernode_command(opts.superlink, node_config_file(settings, state), opts.runtime_port, opts.ca, opts.key,
                            opts.insecure, opts.max_retries, opts.max_wait_time, secret, opts.heartbeat_interval)
    log_path = state / "logs" / "supernode.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"fedtune client: site '{settings.site_id}' -> {opts.superlink} "
          f"({'INSECURE' if opts.insecure else 'TLS, authenticated'}); data {settings.data_path}; "
          f"privacy ledger in {state}; Flower's log in {log_path}", flush=True)
    print(f"fedtune client: privacy (this site's own, whatever a run config asks): {_policy_line(settings)}; "
          f"dataset '{settings.dataset_name}'", flush=True)
    print(f"fedtune client: shares (a run naming other columns or labels is refused): {_shares_line(settings)}",
          flush=True)
    view = SiteRoundView(settings.site_id, state).start()
    env = flower_env()
    with processes.terminate_on_signals(), open(log_path, "ab") as flower_log:
        # The SuperNode and the site worker log to the file; with --verbose to the console too.
        output = {} if opts.verbose else {"stdout": flower_log, "stderr": subprocess.STDOUT}
        supernode = processes.start(cmd, env, **output)
        worker = WorkerKeeper(worker_command(opts.runtime_port, secret), env, output)
        rc = 130
        try:
            worker.start()
            while (code := supernode.poll()) is None:
                worker.check()
                time.sleep(0.5)
            rc = code
            return rc
        except KeyboardInterrupt:
            print("fedtune client: stopping", file=sys.stderr)
            return 130
        except DeploymentError as exc:
            print(f"fedtune client: {exc}; stopping", file=sys.stderr)
            rc = 1
            return rc
        finally:
            worker.stop()
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
