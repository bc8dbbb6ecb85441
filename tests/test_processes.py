"""The Flower children of `fedtune server` / `fedtune client` never outlive it."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from fedtune.deployment import processes

# A stand-in for flower-supernode: it starts its own app process (like flwr-clientapp) and runs.
FLOWER_LIKE = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"]


def _gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def _family(pid, count, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(pid).children(recursive=True)
        if len(kids) >= count:
            return [k.pid for k in kids]
        time.sleep(0.2)
    raise TimeoutError("children did not start")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_when_the_agent_is_killed_outright(tmp_path):
    """`kill -9` of the fedtune process: its guard sees it die and stops the whole group."""
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from fedtune.deployment import processes
        processes.start({FLOWER_LIKE!r}, dict(os.environ))
        time.sleep(300)
    """)])
    family = _family(agent.pid, 3)  # guard, the Flower-like command, its app process
    agent.kill()
    agent.wait()
    assert _gone(family, 30) == []


def test_stop_ends_the_group_and_a_second_signal_skips_the_grace_period():
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(300)"]
    before = signal.getsignal(signal.SIGHUP)
    proc = processes.start(stubborn, dict(os.environ))
    family = [proc.pid, *_family(proc.pid, 1)]
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGHUP))
    timer.start()
    started = time.monotonic()
    processes.stop(proc, grace=60)
    assert time.monotonic() - started < 8  # neither the 60 s grace nor the guard's 10 s
    assert _gone(family, 5) == []
    assert signal.getsignal(signal.SIGHUP) is before  # the escalation handler was only for the stop


def test_sighup_and_sigterm_stop_like_ctrl_c():
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt):
            with processes.terminate_on_signals():
                os.kill(os.getpid(), sig)
                time.sleep(1)
