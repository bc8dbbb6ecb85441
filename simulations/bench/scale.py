"""Scale: 10, 50 and 100 simulated sites, about 10 of them sampled to train (and evaluate) each
round: wall time per round and the peak memory of the whole process tree (this process, Ray's
services and its workers; the sum of resident sets, which counts shared pages more than once,
so it errs high). Target: 100 sites on 2 cores and 24 GB with at most 8 GB peak.

    python -m simulations.bench.scale [--size tiny|default|full]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from .common import SIZES, config, federated_run, log, model_name, table, write_json

SITES = {"tiny": [6], "default": [10, 50, 100], "full": [10, 50, 100, 200]}
PER_ROUND = {"tiny": 3, "default": 10, "full": 10}
TARGET_BYTES = 8 * 2**30


class PeakMemory:
    """Samples the resident memory of this process and all its descendants twice a second."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        for n in SITES[size]:
            fraction = min(1.0, PER_ROUND[size] / n)
            cfg = config(model, [
                "data.builtin=demo", f"data.builtin_rows={n * 12 + 60}", "data.eval_fraction=0.05",
                "model.max_length=32", "train.epochs=1", "train.batch_size=16",
                f"federation.sites={n}", "federation.rounds=2", "federation.partition=iid",
                f"federation.fraction_train={fraction}", f"federation.fraction_evaluate={fraction}",
                "federation.secure_aggregation=true",
            ])
            log(f"scale: {n} sites, {int(fraction * n)} per round")
            started = time.perf_counter()
            with PeakMemory() as memory:
                records = federated_run(cfg, work / f"run-{n}")
            wall = time.perf_counter() - started
            rounds = [r for r in records if r["round"] > 0]
            per_round = sum(r["seconds"] for r in rounds) / len(rounds)
            trained = sum(len(r["sites"]) for r in rounds) / len(rounds)
            results.append({"sites": n, "sites_per_round": trained, "seconds_per_round": per_round,
                            "run_wall_s": wall, "peak_rss_bytes": memory.peak,
                            "meets_target": memory.peak <= TARGET_BYTES})
            rows.append([n, trained, per_round, wall, memory.peak / 2**30,
                         "yes" if memory.peak <= TARGET_BYTES else "no"])
    text = table(["sites", "trained/round", "s/round", "run wall s", "peak GiB", "<= 8 GiB"], rows)
    print(f"\nScale (SecAgg+, 2 rounds, Flower simulation on Ray)\n{text}")
    payload = {"target_peak_bytes": TARGET_BYTES, "results": results, "table": text}
    write_json("scale", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run(args.size, args.out)


if __name__ == "__main__":
    main()
