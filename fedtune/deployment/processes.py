"""Child processes that never outlive their parent command.

Each Flower command (SuperLink, SuperNode) runs under a small guard (``python -m
fedtune.deployment.guard``) in a process group of its own; Flower's own app processes
(flwr-serverapp, flwr-clientapp) join that group. The guard asks Linux to send it SIGTERM when
its parent dies (prctl PR_SET_PDEATHSIG), so even when ``fedtune server`` / ``fedtune client``
is killed outright (OOM killer, ``kill -9``) the guard stops the whole group. On a normal exit,
Ctrl-C, SIGTERM or SIGHUP the parent stops the group itself: SIGTERM, then SIGKILL after a grace
period, or at once on a second signal."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver ``sig`` to this process when its parent exits (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass


def guarded(cmd: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedtune.deployment.guard", *cmd]


def start(cmd: list[str], env: dict, **kwargs) -> subprocess.Popen:
    env = {**env, "FEDTUNE_GUARD_PARENT": str(os.getpid())}
    return subprocess.Popen(guarded(cmd), env=env, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the whole group, then SIGKILL after ``grace`` seconds or on a second signal."""
    previous = {}
    try:
        for sig in STOP_SIGNALS:  # a second Ctrl-C / SIGTERM / SIGHUP: no more waiting
            previous[sig] = signal.signal(sig, lambda *_: _signal_group(proc, signal.SIGKILL))
    except ValueError:  # not the main thread: no handlers, the grace period still applies
        pass
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Grandchildren (flwr-serverapp, flwr-clientapp) may outlive their parent: kill the group.
        _signal_group(proc, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (a systemd or container stop, a closed terminal) into
    KeyboardInterrupt, like Ctrl-C, so `finally` blocks stop the children."""
    def _raise(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
