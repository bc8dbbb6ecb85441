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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
