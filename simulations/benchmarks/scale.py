"""Scale: 10, 50 and 100 simulated sites, about 10 of them sampled to train (and evaluate) each
round (federation.fraction_train), with SecAgg+: wall time per round and the peak memory of the
whole process tree (this process, Ray's services and its workers). Target: 100 sites on 2 cores
and 24 GB with at most 8 GB peak.

    python -m simulations.benchmarks.scale [--size tiny|default|full]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from simulations.benchmarks.common import config, federated_run, log, main_for, model_name, table, write_json
from simulations.benchmarks.memory import PeakMemory

SITES = {"tiny": [6], "default": [10, 50, 100], "full": [10, 50, 100, 200]}
PER_ROUND = {"tiny": 3, "default": 10, "full": 10}
ROUNDS = {"tiny": 2, "default": 2, "full": 3}
TARGET_BYTES = 8 * 2**30


def _config(model: str, sites: int, fraction: float, rounds: int):
    return config(model, [
        "data.builtin=demo", f"data.builtin_rows={sites * 12 + 60}", "data.eval_fraction=0.05",
        "model.max_length=32", "train.epochs=1", "train.batch_size=16",
        # DP-SGD on, with a fixed noise multiplier: calibrating one takes seconds and is not what
        # is measured here. The sites accept it past their budgets (their own switch): this
        # measures cost, not privacy.
        "privacy.noise_multiplier=1.0", 'federation.site_privacy={"*"={allow_non_private=true}}',
        f"federation.sites={sites}", f"federation.rounds={rounds}", "federation.partition=iid",
        f"federation.fraction_train={fraction}", f"federation.fraction_evaluate={fraction}",
        "federation.secure_aggregation=true",
    ])


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        for n in SITES[size]:
            fraction = min(1.0, PER_ROUND[size] / n)
            log(f"scale: {n} sites, about {int(fraction * n)} per round")
            started = time.perf_counter()
            with PeakMemory() as memory:
                records = federated_run(_config(model, n, fraction, ROUNDS[size]), work / f"run-{n}")
            wall = time.perf_counter() - started
            rounds = [r for r in records if r["round"] > 0]
            per_round = sum(r["seconds"] for r in rounds) / len(rounds)
            trained = sum(len(r["sites"]) for r in rounds) / len(rounds)
            ok = memory.peak <= TARGET_BYTES
            results.append({"sites": n, "sites_per_round": trained, "seconds_per_round": per_round,
                            "round_seconds": [r["seconds"] for r in rounds], "run_wall_s": wall,
                            "peak_rss_bytes": memory.peak, "memory_samples": memory.samples, "meets_target": ok})
            rows.append([n, trained, per_round, wall, memory.peak / 2**30, ok])
    text = table(["sites", "trained/round", "s/round", "run wall s (incl. start-up)", "peak RSS GiB (tree)",
                  "<= 8 GiB"], rows)
    print(f"\nScale (SecAgg+, {ROUNDS[size]} rounds, Flower simulation on Ray)\n{text}")
    payload = {"target_peak_bytes": TARGET_BYTES, "rounds": ROUNDS[size], "results": results, "table": text}
    write_json("scale", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
