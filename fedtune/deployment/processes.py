"""Child processes that never outlive their parent command: each runs in its own process group,
and the group (the SuperLink with its ServerApp, the SuperNode with its ClientApps) is stopped
on exit, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager
from typing import Iterator


def start(cmd: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the whole group, then SIGKILL after ``grace`` seconds."""
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


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop the children (a systemd
    stop or a container stop sends SIGTERM)."""
    def _raise(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
