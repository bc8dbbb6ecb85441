"""Learning-rate schedule: linear warmup, then cosine decay to zero over the planned steps."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(base_lr: float, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """``lr(step)`` for a schedule over ``total_steps``. A federated site evaluates it at its
    global step (earlier rounds' steps + this round's), so the schedule spans the whole run."""
    total = max(1, total_steps)
    warmup = int(round(total * warmup_ratio))

    def lr(step: int) -> float:
        if step < warmup:
            return base_lr * (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr
