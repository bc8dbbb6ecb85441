"""Group privacy: what a row-level (epsilon, delta) guarantee says about k rows together.

If a mechanism is (eps, delta)-DP for datasets that differ in one row, it is
(k*eps, k*exp((k-1)*eps)*delta)-DP for datasets that differ in k rows (the standard group
privacy conversion; Dwork & Roth, "The Algorithmic Foundations of Differential Privacy",
Lemma 2.2 and its (eps, delta) extension). A person with at most k rows is such a group.
"""

from __future__ import annotations

import math


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of ``k`` rows. The delta may reach 1 or more: then the
    guarantee says nothing, and callers must show it as such, never cap it."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k == 1:
        return float(epsilon), float(delta)
    if not math.isfinite(epsilon):
        return math.inf, math.inf
    eps_k = k * float(epsilon)
    try:
        delta_k = k * math.exp((k - 1) * float(epsilon)) * float(delta)
    except OverflowError:
        delta_k = math.inf
    return eps_k, delta_k
