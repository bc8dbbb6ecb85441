"""DP cost in time: the median step time of DP-SGD against a non-private step for the same LoRA
model, batch and sequence length, all variants interleaved in one process (so a busy machine
slows every variant alike), with Opacus's per-sample hooks and with ghost clipping, in fp32 and
(where the CPU or GPU has native bf16) bf16.

    python -m simulations.bench.step_time [--size tiny|default|full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .common import SIZES, config, log, median, model_name, table, write_json

SHAPES = {  # batch, sequence length, timed repeats per variant
    "tiny": (8, 16, 3),
    "default": (32, 64, 15),
    "full": (64, 128, 30),
}


def _variants(precisions: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for precision in precisions:
        out += [("non-DP", "none", precision), ("DP hooks", "hooks", precision), ("DP ghost", "ghost", precision)]
    return out


def _trainer(model: str, mode: str, precision: str, batch, device):
    import torch

    from fedtune.data.tokenization import TokenizedDataset
    from fedtune.model import build_model, load_tokenizer
    from fedtune.training.trainer import LocalTrainer

    cfg = config(model, [f"privacy.enabled={'false' if mode == 'none' else 'true'}",
                         f"privacy.grad_sample_mode={'hooks' if mode == 'none' else mode}",
                         f"train.batch_size={batch[0].shape[0]}", f"train.precision={precision}"])
    tokenizer = load_tokenizer(cfg.model)
    net = build_model(cfg.model, cfg.lora, tokenizer, {0: "neg", 1: "pos"}, device, seed=0)
    # The loader is never iterated (steps get the fixed batch); Opacus only needs its length.
    data = TokenizedDataset([row.tolist() for row in batch[0]], batch[2].tolist())
    trainer = LocalTrainer(net, data, lambda items: items, cfg.model.task, cfg.train, cfg.privacy, device,
                           precision, noise_multiplier=1.0 if mode != "none" else 0.0, seed=0)
    torch.manual_seed(0)
    return trainer


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    import torch

    from fedtune.training.precision import cpu_has_native_bf16

    batch_size, seq_len, repeats = SHAPES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    native_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    precisions = ["fp32", "bf16"] if native_bf16 else ["fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        model = model_name(size, Path(workdir or tmp))
        from fedtune.model import load_tokenizer

        vocab = len(load_tokenizer(config(model).model))
        gen = torch.Generator().manual_seed(0)
        batch = (torch.randint(5, vocab, (batch_size, seq_len), generator=gen),
                 torch.ones(batch_size, seq_len, dtype=torch.long),
                 torch.randint(0, 2, (batch_size,), generator=gen))
        variants = _variants(precisions)
        trainers = {v: _trainer(model, v[1], v[2], batch, device) for v in variants}
        times: dict = {v: [] for v in variants}
        for rep in range(repeats + 2):  # the first two rounds warm up (allocations, hooks)
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: no order bias
            for v in order:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainers[v].step(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep >= 2:
                    times[v].append(time.perf_counter() - start)
            log(f"step_time: repeat {rep + 1}/{repeats + 2}")
    rows, results = [], []
    for name, mode, precision in variants:
        ms = 1000 * median(times[(name, mode, precision)])
        base = 1000 * median(times[("non-DP", "none", precision)])
        results.append({"variant": name, "precision": precision, "median_ms": ms, "ratio_vs_non_dp": ms / base,
                        "examples_per_s": batch_size / (ms / 1000),
                        "samples_ms": [1000 * t for t in times[(name, mode, precision)]]})
        rows.append([name, precision, ms, ms / base, batch_size / (ms / 1000)])
    skipped = [] if native_bf16 else [f"bf16: this {device.type.upper()} has no native bf16 (emulated bf16 is not a "
                                      "meaningful comparison); not timed"]
    text = table(["variant", "precision", "median ms/step", "x non-DP", "examples/s"], rows)
    print(f"\nDP step time, batch {batch_size} x {seq_len} tokens, {repeats} interleaved repeats, {device}\n{text}")
    for note in skipped:
        print(note)
    payload = {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "device": str(device),
               "model": model if size == "tiny" else "all-MiniLM-L6-v2", "results": results, "skipped": skipped,
               "table": text}
    write_json("step_time", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run(args.size, args.out)


if __name__ == "__main__":
    main()
