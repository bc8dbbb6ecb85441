"""Choosing and applying mixed precision (torch.autocast) for DP-SGD."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    pass


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 on CPU is emulated and was measured ~24x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` picks the fastest correct choice for the device: bf16 on CUDA cards and CPUs
    that support it natively, fp16 on older CUDA cards, fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("train.precision = 'bf16': this CUDA device does not support bf16; use fp16 or fp32")
    return requested


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


class PerSampleLossScaler:
    """A fixed loss scale for fp16 that works with per-sample gradients.

    torch's GradScaler unscales only ``p.grad``; Opacus builds its update from
    ``p.grad_sample``, which the scaler never touches. Here the per-sample gradients are
    unscaled in fp32 before the DP step. A sample whose gradient overflowed contributes
    zero (as if clipped to norm 0), so the step, and its privacy accounting, still happen.

    The scale is chosen before training and never changes. A dynamic scale (halved after an
    overflow, grown after clean steps) is state shared by every later batch and set by the data:
    one example that overflows would change how later examples are scaled, and so whether
    they overflow and are zeroed, an influence on other rows' contributions that the clip norm
    does not bound and DP-SGD's accounting does not cover. With a fixed scale each example's
    contribution depends on that example alone.
    """

    def __init__(self, scale: float = 2.0**12):
        self.scale = float(scale)
        self.overflowed_samples = 0   # for the site's own log; never sent

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        bad = None
        for p in params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                continue
            gs = gs.float() / self.scale
            row_bad = ~torch.isfinite(gs.reshape(gs.shape[0], -1)).all(dim=1)
            bad = row_bad if bad is None else bad | row_bad
            p.grad_sample = gs
        if bad is not None and bad.any():
            for p in params:
                if getattr(p, "grad_sample", None) is not None:
                    p.grad_sample[bad] = 0.0
            self.overflowed_samples += int(bad.sum())
