"""``python -m fedtune.deployment.guard CMD...``: runs CMD in this process group and stops the
whole group (CMD and whatever it started) when asked to (SIGTERM, SIGINT, SIGHUP) or when the
parent fedtune command dies, however it dies (see processes.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .processes import STOP_SIGNALS, die_with_parent

GRACE = 10.0


def main(argv: list[str]) -> int:
    die_with_parent(signal.SIGTERM)
    parent = os.getppid()
    if str(parent) != os.environ.get("FEDTUNE_GUARD_PARENT", str(parent)):
        return 1  # the parent died before prctl took effect
    child = subprocess.Popen(argv)  # same process group as this guard
    stopping = []

    def stop(signum, frame):
        if stopping:  # a second signal: no grace period
            os.killpg(os.getpgrp(), signal.SIGKILL)
        stopping.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    while child.poll() is None and not stopping:
        time.sleep(0.2)
        if os.getppid() != parent:  # belt and braces: the parent is gone
            stopping.append(signal.SIGTERM)
    if stopping:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        _stop_group()
    return child.wait() if child.returncode is None else child.returncode


def _stop_group() -> None:
    """SIGTERM to every other process of the group, SIGKILL to what is left after GRACE."""
    group, me = os.getpgrp(), os.getpid()
    if not os.path.isdir("/proc"):  # no process table to read: the direct child only
        os.killpg(group, signal.SIGTERM)
        time.sleep(GRACE)
        os.killpg(group, signal.SIGKILL)
    others = _members(group, me)
    for pid in others:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and _members(group, me):
        time.sleep(0.2)
    for pid in _members(group, me):
        _kill(pid, signal.SIGKILL)


def _members(group: int, me: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and int(entry) != me:
            try:
                if os.getpgid(int(entry)) == group and not _zombie(int(entry)):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
