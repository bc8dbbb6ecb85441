"""Epsilon as reports show it: a number, or what it really is when it is not one.

A site that trained with noise 0 has an infinite epsilon; one that trained without DP at all
has none. Neither may look like a blank ("-"), which reads as "not recorded" and flatters the
run. JSON has no infinity, so records hold the strings :data:`INF` / :data:`NO_DP` there.
"""

from __future__ import annotations

import math
from typing import Optional, Union

INF = "inf"
NO_DP = "undefined (no DP)"

EpsilonValue = Union[float, str, None]


def epsilon_record(value: Optional[float], accountant: Optional[str] = None) -> EpsilonValue:
    """What a JSON record stores: the float if finite, else ``"inf"`` or ``"undefined (no DP)"``."""
    if accountant == "none":
        return NO_DP
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return NO_DP
    return value if math.isfinite(value) else INF


def epsilon_number(value: EpsilonValue) -> Optional[float]:
    """A record's epsilon as a float for comparisons and plots: inf for ``"inf"`` and for no DP
    (no guarantee is the weakest guarantee), None only when nothing was recorded."""
    if value is None:
        return None
    if isinstance(value, str):
        return math.inf
    return float(value)


def format_epsilon(value: EpsilonValue, accountant: Optional[str] = None) -> str:
    if accountant == "none" or value == NO_DP:
        return NO_DP
    if value is None:
        return "-"
    number = epsilon_number(value)
    return INF if math.isinf(number) else f"{number:.4g}"


def worst_epsilon(values: list[EpsilonValue]) -> EpsilonValue:
    """The largest epsilon of several sites; no DP beats inf beats any number; None if none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if NO_DP in present:
        return NO_DP
    return max(present, key=lambda v: epsilon_number(v))
