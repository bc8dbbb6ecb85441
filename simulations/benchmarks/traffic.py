"""Traffic: bytes each site sends and receives per round, measured on the real serialised Flower
messages (the coordinator's MeteredGrid, recorded in metrics.jsonl), against the full model's
fp32 size; LoRA against FFA-LoRA, with and without SecAgg+ (whose masked vectors are int64:
8 bytes per value, where plain FedAvg sends fp32). Target: at most 0.2% of the model per round.

    python -m simulations.benchmarks.traffic [--size tiny|default|full]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from simulations.benchmarks.common import (config, federated_run, log, main_for, model_fp32_bytes, model_name,
                                           table, write_json)

TARGET = 0.002  # share of the full model's fp32 bytes, per site and round
SITES = 3       # the fewest SecAgg+ accepts with integer shares


def _variants(size: str) -> list[tuple[str, int, bool, bool]]:
    """(name, LoRA rank, FFA-LoRA, SecAgg+)."""
    if size == "tiny":  # the three runs the test compares
        return [("LoRA r=4", 4, False, True), ("LoRA r=4", 4, False, False), ("FFA-LoRA r=4", 4, True, True)]
    ranks = {"default": [8], "full": [16, 8, 2]}[size]
    return [(f"{'FFA-LoRA' if ffa else 'LoRA'} r={r}", r, ffa, secure)
            for r in ranks for ffa in (False, True) for secure in (True, False)]


def _config(model: str, rank: int, ffa: bool, secure: bool):
    # One round of one small local step: the bytes do not depend on how long sites train.
    return config(model, [
        "data.builtin=demo", "data.builtin_rows=120", "model.max_length=32", f"lora.r={rank}",
        f"lora.alpha={2 * rank}", f"lora.freeze_a={'true' if ffa else 'false'}", "train.epochs=1",
        "train.batch_size=64",
        # DP-SGD on, with a fixed noise multiplier: calibrating one takes seconds and is not what
        # is measured here. The sites accept it past their budgets (their own switch): this
        # measures cost, not privacy.
        "privacy.noise_multiplier=1.0", 'federation.site_privacy={"*"={allow_non_private=true}}', f"federation.sites={SITES}", "federation.rounds=1", "federation.partition=iid",
        f"federation.secure_aggregation={'true' if secure else 'false'}",
    ])


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        model_bytes = model_fp32_bytes(model)
        rows, results = [], []
        for name, rank, ffa, secure in _variants(size):
            log(f"traffic: {name}, {'SecAgg+' if secure else 'plain FedAvg'}")
            record = federated_run(_config(model, rank, ffa, secure), work / f"run-{rank}-{ffa}-{secure}")[-1]
            # Per site: the round's train and evaluate messages (SecAgg+: its four train stages).
            up = sum(record["bytes_up"].values()) / len(record["bytes_up"])
            down = sum(record["bytes_down"].values()) / len(record["bytes_down"])
            share = up / model_bytes
            results.append({"variant": name, "rank": rank, "ffa": ffa, "secure_aggregation": secure,
                            "bytes_up_per_site": up, "bytes_down_per_site": down, "up_share_of_model": share,
                            "down_share_of_model": down / model_bytes, "meets_target": share <= TARGET})
            rows.append([name, "SecAgg+" if secure else "plain", up / 1e3, down / 1e3, f"{100 * share:.3f}%",
                         f"{100 * down / model_bytes:.3f}%", share <= TARGET])
    text = table(["adapter", "aggregation", "kB up/site/round", "kB down/site/round", "up / model fp32",
                  "down / model fp32", f"up <= {100 * TARGET:g}%"], rows)
    print(f"\nTraffic per site and round ({SITES} sites, 1 round); full model fp32: {model_bytes / 1e6:.1f} MB\n{text}")
    payload = {"model_fp32_bytes": model_bytes, "sites": SITES, "target_share": TARGET, "results": results,
               "table": text}
    write_json("traffic", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
