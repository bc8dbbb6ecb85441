"""DP cost in time: the median step time of DP-SGD against a non-private step for the same LoRA
model, batch and sequence length. All variants live in one process and take turns step by step
(the order rotates every repeat), so a busy machine slows every variant alike and the ratios
stay meaningful. Opacus per-sample hooks and ghost clipping; fp32, and bf16 where the CPU (or
GPU) supports it natively. Target: DP at most 1.05x the non-private step for adapters.

    python -m simulations.benchmarks.step_time [--size tiny|default|full]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from simulations.benchmarks.common import config, log, main_for, median, model_name, table, write_json

SHAPES = {  # batch, sequence length, timed repeats per variant
    "tiny": (8, 16, 3),
    "default": (32, 64, 15),
    "full": (64, 128, 30),
}
WARMUP = 2      # untimed repeats: first allocations, hook set-up
TARGET = 1.05   # DP step / non-private step


def _variants(precisions: list[str]) -> list[tuple[str, str, str]]:
    """(name, Opacus mode or "none", precision)."""
    return [(name, mode, p) for p in precisions
            for name, mode in (("non-DP", "none"), ("DP hooks", "hooks"), ("DP ghost", "ghost"))]


def bf16_status(device) -> tuple[bool, str]:
    """Whether bf16 autocast is worth timing here, and why not when it is not."""
    import torch

    from fedtune.training.precision import cpu_has_native_bf16

    if device.type == "cuda":
        return (True, "") if torch.cuda.is_bf16_supported() else (False, "this GPU has no bf16")
    if cpu_has_native_bf16():
        return True, ""
    # Autocast itself runs on any CPU, but without AVX512-BF16/AMX it is emulated and an order
    # of magnitude slower (opacus-peft notes): timing it would only measure the emulation.
    return False, (f"bf16: not supported natively on this CPU (torch CPU capability "
                   f"{torch.backends.cpu.get_cpu_capability()}, no avx512_bf16/amx_bf16); not timed")


def _trainer(model: str, mode: str, precision: str, batch, device):
    from fedtune.data.tokenization import TokenizedDataset
    from fedtune.model import build_model, load_tokenizer
    from fedtune.training.trainer import LocalTrainer

    dp = mode != "none"
    cfg = config(model, [f"privacy.enabled={'true' if dp else 'false'}",
                         f"privacy.grad_sample_mode={mode if dp else 'hooks'}",
                         f"train.batch_size={batch[0].shape[0]}", "train.learning_rate=1e-3",
                         f"train.precision={precision}"])
    net = build_model(cfg.model, cfg.lora, load_tokenizer(cfg.model), {0: "neg", 1: "pos"}, device, seed=0)
    # The loader is never iterated (every step gets the same fixed batch); Opacus only needs it
    # to set up Poisson sampling and the noise scale.
    data = TokenizedDataset([row.tolist() for row in batch[0]], batch[2].tolist())
    return LocalTrainer(net, data, lambda items: items, cfg.model.task, cfg.train, cfg.privacy, device,
                        precision, noise_multiplier=1.0 if dp else 0.0)


def _time_interleaved(trainers: dict, batch, repeats: int, device) -> dict:
    import torch

    variants = list(trainers)
    times: dict = {v: [] for v in variants}
    for rep in range(repeats + WARMUP):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:  # rotate the order: no variant always goes first
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainers[v].step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= WARMUP:
                times[v].append(time.perf_counter() - start)
        log(f"step_time: repeat {rep + 1}/{repeats + WARMUP}{' (warm-up)' if rep < WARMUP else ''}")
    return times


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    import torch

    from fedtune.model import load_tokenizer

    batch_size, seq_len, repeats = SHAPES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16_ok, bf16_note = bf16_status(device)
    precisions = ["fp32", "bf16"] if bf16_ok else ["fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        model = model_name(size, Path(workdir or tmp))
        vocab = len(load_tokenizer(config(model).model))
        gen = torch.Generator().manual_seed(0)
        # Full-length random token ids: every variant pays for exactly seq_len tokens.
        batch = (torch.randint(5, vocab, (batch_size, seq_len), generator=gen),
                 torch.ones(batch_size, seq_len, dtype=torch.long),
                 torch.randint(0, 2, (batch_size,), generator=gen))
        trainers = {v: _trainer(model, v[1], v[2], batch, device) for v in _variants(precisions)}
        times = _time_interleaved(trainers, batch, repeats, device)
    rows, results = [], []
    for (name, mode, precision), samples in times.items():
        base_samples = times[("non-DP", "none", precision)]
        ms, base = 1000 * median(samples), 1000 * median(base_samples)
        ratio = ms / base
        # The same repeat's steps ran back to back, under the same load: their ratio is the
        # figure that other work on the machine disturbs least.
        paired = median([t / b for t, b in zip(samples, base_samples)])
        results.append({"variant": name, "grad_sample_mode": mode, "precision": precision, "median_ms": ms,
                        "ratio_vs_non_dp": ratio, "paired_ratio_median": paired,
                        "examples_per_s": batch_size / (ms / 1000),
                        "meets_target": paired <= TARGET if mode != "none" else None,
                        "samples_ms": [1000 * t for t in samples]})
        rows.append([name, precision, ms, ratio, paired, batch_size / (ms / 1000),
                     (paired <= TARGET) if mode != "none" else None])
    if not bf16_ok:
        rows.append(["any", "bf16", "not supported", None, None, None, None])
    text = table(["variant", "precision", "median ms/step", "x non-DP (medians)", "x non-DP (paired, median)",
                  "examples/s", f"paired <= {TARGET}x"], rows)
    print(f"\nDP step time: batch {batch_size} x {seq_len} tokens, {repeats} interleaved repeats, {device}\n{text}")
    if bf16_note:
        print(bf16_note)
    payload = {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "device": str(device),
               "model": model if size == "tiny" else "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + head",
               "target_ratio": TARGET, "bf16": "timed" if bf16_ok else bf16_note, "results": results, "table": text}
    write_json("step_time", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
