"""Peak resident memory of a whole process tree (this process, Ray's services and workers)."""

from __future__ import annotations

import threading


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants in a background thread.

    A sum of resident sets counts pages shared between processes (torch's libraries, the
    model files mapped by every worker) once per process, so it errs high: a safe upper bound.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self.peaks: dict[str, int] = {}   # per tracked process tree (track())
        self._tracked: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def track(self, name: str, pid: int) -> None:
        """Also keep the peak of the tree under ``pid`` on its own (one site agent, say)."""
        self._tracked[name] = pid
        self.peaks.setdefault(name, 0)

    @staticmethod
    def tree_rss(pid: int) -> int:
        import psutil

        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:  # gone
            return 0
        total = 0
        for proc in family:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def sample(self) -> int:
        import os

        return self.tree_rss(os.getpid())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            for name, pid in list(self._tracked.items()):
                self.peaks[name] = max(self.peaks[name], self.tree_rss(pid))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
