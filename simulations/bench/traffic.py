"""Traffic: bytes each site sends and receives per round, measured on the real serialised
Flower messages (the coordinator's MeteredGrid), against the full model's fp32 size; LoRA against
FFA-LoRA, with and without SecAgg+ (whose masked vectors are int64: 8 bytes per value).

    python -m simulations.bench.traffic [--size tiny|default|full]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import SIZES, config, federated_run, log, model_fp32_bytes, model_name, table, write_json

TARGET = 0.002  # at most 0.2% of the model per round


def _variants(size: str) -> list[tuple[str, int, bool, bool]]:
    """(name, LoRA rank, FFA-LoRA, SecAgg+); tiny mode keeps the three runs its test compares."""
    if size == "tiny":
        return [("LoRA r=4", 4, False, True), ("LoRA r=4", 4, False, False), ("FFA-LoRA r=4", 4, True, True)]
    ranks = {"default": [8], "full": [16, 8, 2]}[size]
    return [(f"{'FFA-LoRA' if ffa else 'LoRA'} r={r}", r, ffa, secure)
            for r in ranks for ffa in (False, True) for secure in (True, False)]


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        model_bytes = model_fp32_bytes(model)
        rows, results = [], []
        for name, rank, ffa, secure in _variants(size):
            log(f"traffic: {name}, {'SecAgg+' if secure else 'plain'}")
            cfg = config(model, [
                "data.builtin=demo", "data.builtin_rows=240", "model.max_length=32", f"lora.r={rank}",
                f"lora.alpha={2 * rank}", f"lora.freeze_a={'true' if ffa else 'false'}", "train.epochs=1",
                "federation.sites=3", "federation.rounds=1", "federation.partition=iid",
                f"federation.secure_aggregation={'true' if secure else 'false'}",
            ])
            record = federated_run(cfg, work / f"run-{rank}-{ffa}-{secure}")[-1]
            up = sum(record["bytes_up"].values()) / len(record["bytes_up"])
            down = sum(record["bytes_down"].values()) / len(record["bytes_down"])
            result = {"variant": name, "rank": rank, "ffa": ffa, "secure_aggregation": secure,
                      "bytes_up_per_site": up, "bytes_down_per_site": down,
                      "up_share_of_model": up / model_bytes, "meets_target": up / model_bytes <= TARGET}
            results.append(result)
            rows.append([name, "SecAgg+" if secure else "plain", up / 1e3, down / 1e3,
                         f"{100 * up / model_bytes:.3f}%", "yes" if result["meets_target"] else "no"])
    text = table(["adapter", "aggregation", "KB up/site/round", "KB down/site/round", "up / model fp32",
                  f"<= {100 * TARGET:g}%"], rows)
    print(f"\nTraffic per site and round (3 sites, 1 round); full model fp32: {model_bytes / 1e6:.1f} MB\n{text}")
    payload = {"model_fp32_bytes": model_bytes, "target_share": TARGET, "results": results, "table": text}
    write_json("traffic", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run(args.size, args.out)


if __name__ == "__main__":
    main()
