"""Secure aggregation cost: round wall time with SecAgg+ against plain FedAvg, for 3, 10 and 30
simulated sites, with the real adapter (all-MiniLM-L6-v2, LoRA r=8). Local training is kept
to one step per site so that the round time is mostly the protocol; each pair runs back to back
and the steady-state round (round 2; round 1 also starts Ray's workers) is compared.

    python -m simulations.bench.secagg_cost [--size tiny|default|full]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import SIZES, config, federated_run, log, model_name, table, write_json

SITES = {"tiny": [3], "default": [3, 10, 30], "full": [3, 10, 30, 100]}
TARGET = 1.10


def _config(model: str, sites: int, secure: bool):
    return config(model, [
        "data.builtin=demo", f"data.builtin_rows={sites * 12 + 40}", "data.eval_fraction=0.05",
        "model.max_length=32", "train.epochs=1", "train.batch_size=16",
        f"federation.sites={sites}", "federation.rounds=2", "federation.partition=iid",
        "federation.site_test_fraction=0", f"federation.fraction_evaluate={1 / sites}",
        f"federation.secure_aggregation={'true' if secure else 'false'}",
    ])


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        for n in SITES[size]:
            seconds = {}
            for secure in (False, True):
                log(f"secagg_cost: {n} sites, {'SecAgg+' if secure else 'plain'}")
                records = federated_run(_config(model, n, secure), work / f"run-{n}-{secure}")
                seconds[secure] = records[-1]["seconds"]
            ratio = seconds[True] / seconds[False]
            results.append({"sites": n, "plain_round_s": seconds[False], "secagg_round_s": seconds[True],
                            "ratio": ratio, "meets_target": ratio <= TARGET})
            rows.append([n, seconds[False], seconds[True], ratio, "yes" if ratio <= TARGET else "no"])
    text = table(["sites", "plain FedAvg s/round", "SecAgg+ s/round", "x plain", f"<= {TARGET}x"], rows)
    print(f"\nSecAgg+ vs plain FedAvg, round 2 wall time, simulation\n{text}")
    payload = {"target_ratio": TARGET, "results": results, "table": text}
    write_json("secagg_cost", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run(args.size, args.out)


if __name__ == "__main__":
    main()
