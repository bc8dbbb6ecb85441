"""Processes for a deployment on 127.0.0.1 (the deployment tests and the deploy_load benchmark):
every process started here is stopped, with all its descendants (SuperLink -> flwr-serverapp,
SuperNode -> flwr-clientapp), even on failure. Each runs in its own process group under
fedtune's guard (fedtune/deployment/guard.py), which stops the group if the test or benchmark
that started it dies outright (kill -9, a CI timeout) before it could stop them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedtune.deployment import processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedtune_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *map(str, args)]


class Processes:
    def __init__(self, env: dict, log_dir: Path, cwd: Path | None = None):
        self.env, self.log_dir, self.cwd = env, log_dir, cwd
        self.started: list[tuple[subprocess.Popen, Path]] = []
        self.family: set[int] = set()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """``cmd`` with its output in LOG_DIR/NAME.log; the Popen is its guard, which exits with
        ``cmd``'s status."""
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = processes.start([str(c) for c in cmd], self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd)
        self.started.append((proc, log))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return next(path for p, path in self.started if p is proc).read_text(errors="replace")

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._remember_descendants()
            if proc.poll() is not None:
                return proc.returncode
            time.sleep(0.5)
        raise TimeoutError(f"{proc.args[:4]} still running after {timeout} s:\n{self.log(proc)[-3000:]}")

    def _remember_descendants(self) -> None:
        for proc, _ in self.started:
            try:
                self.family.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass

    def stop_all(self) -> list[int]:
        """SIGTERM (fedtune stops its Flower children on it), then SIGKILL whatever is left.
        Returns the pids still alive afterwards (should be none)."""
        self._remember_descendants()
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.started:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        pids = self.family | {p.pid for p, _ in self.started}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.wait(10)
        time.sleep(0.5)
        return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def tiny_run_config(path: Path, model: Path, held: Path, *, train: dict | None = None,
                    privacy: dict | None = None, federation: dict) -> Path:
    """A deployed run's config on the tiny model (its sizes fixed here), the coordinator's
    evaluation file ``held``; ``train``/``privacy``/``federation`` keys added or replaced."""
    sections = {
        "model": {"name": str(model), "max_length": 24},
        "lora": {"r": 4, "dropout": 0.0},
        "data": {"eval": str(held)},
        "train": {"batch_size": 16, "epochs": 1, **(train or {})},
        "privacy": privacy or {"target_epsilon": 8.0},
        "federation": federation,
    }
    path.write_text("".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
                            for name, keys in sections.items()))
    return path
