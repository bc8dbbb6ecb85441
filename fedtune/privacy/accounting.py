"""Noise calibration and epsilon composition, always through an Opacus accountant.

The noise multiplier is calibrated once for the whole planned training (all rounds times
local steps). Each training call appends (noise, sample rate, steps) to an accountant
history, and epsilon is computed by composing that whole history, never by adding epsilons.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from fedtune.config import PrivacyConfig

log = logging.getLogger(__name__)

# RDP's bound is valid at any order; Opacus only notes that a wider order range could be tighter.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)

Mechanism = Literal["prv", "rdp"]


class AccountantHistory(BaseModel):
    """An Opacus accountant's state: ``[(noise_multiplier, sample_rate, steps), ...]``."""

    mechanism: Mechanism
    history: list[tuple[float, float, int]] = Field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.history)

    def extended(self, noise_multiplier: float, sample_rate: float, steps: int) -> "AccountantHistory":
        return AccountantHistory(
            mechanism=self.mechanism, history=[*self.history, (noise_multiplier, sample_rate, steps)]
        )

    def epsilon(self, delta: float) -> float:
        return compute_epsilon(self.history, delta, self.mechanism)


class PrivacySpend(BaseModel):
    """What a training spent, as written to metrics.json / privacy.json."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    sample_rate: float
    accountant: Mechanism


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, mechanism: Mechanism) -> float:
    """Epsilon of the composed history at ``delta``; inf when any step had no noise."""
    history = [(float(n), float(q), int(s)) for n, q, s in history if int(s) > 0]
    if not history:
        return 0.0
    if any(n <= 0 for n, _, _ in history):
        return math.inf
    # Composition does not depend on order: merge calls with the same noise and sample rate, so
    # that a plan of R rounds and the R ledger entries it becomes compose to the same number.
    merged: dict[tuple[float, float], int] = {}
    for n, q, s in history:
        merged[(n, q)] = merged.get((n, q), 0) + s
    return _composed_epsilon(tuple((n, q, s) for (n, q), s in merged.items()), float(delta), mechanism)


# Above this RDP epsilon the PRV accountant is not asked (see _composed_epsilon); the numbers a
# run can meaningfully spend are far below it.
PRV_LIMIT = 100.0
PRV_MAX_STEPS = 50_000  # steps of one history above which PRV is not asked either (its memory grows with them)


@lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, mechanism: Mechanism) -> float:
    # Pure and called with the same history again and again (every budget check of a round):
    # remember the result instead of composing again.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal RDP orders at the range edge
        if mechanism == "prv":
            # RDP's epsilon is a valid upper bound, cheap at any noise. PRV is tighter but its
            # numerics need memory and time that explode as the noise vanishes (noise 0.05: GiBs,
            # minutes, then MemoryError) or the steps grow (2 million steps: MemoryError), both
            # of which a hostile run config could ask for. Where even the bound says "no
            # privacy", or past PRV_MAX_STEPS, report the bound (conservative, never smaller).
            bound = _epsilon_of("rdp", history, delta)
            if bound > PRV_LIMIT or sum(s for _, _, s in history) > PRV_MAX_STEPS:
                return bound
        return _epsilon_of(mechanism, history, delta)


def _epsilon_of(mechanism: Mechanism, history: tuple, delta: float) -> float:
    accountant = create_accountant(mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    mechanism: Mechanism,
    prior_history: list[tuple[float, float, int]] | None = None,
) -> float:
    """The smallest noise multiplier whose ``total_steps`` steps at ``sample_rate`` (after any
    ``prior_history``) stay within ``target_epsilon`` at ``delta``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not prior_history:
        return _calibrate_fresh(float(target_epsilon), float(delta), float(sample_rate), int(total_steps), mechanism)
    return _calibrate_after(target_epsilon, delta, sample_rate, total_steps, mechanism, prior_history)


def planned_noise(privacy: "PrivacyConfig", sample_rate: float, total_steps: int,
                  prior_history: list[tuple[float, float, int]] | None = None) -> float:
    """The noise multiplier of a whole planned DP training (every round x local step, never per
    call): ``privacy.noise_multiplier`` where the run fixes one, else the accountant's smallest
    noise that keeps ``total_steps`` steps at ``sample_rate``, after ``prior_history``, within
    ``privacy.target_epsilon`` at ``privacy.target_delta``. The one place noise is calibrated:
    ``auto``'s batch search (fedtune/training/auto.py), ``train-local`` (fedtune/local.py),
    ``fedtune privacy plan`` (fedtune/privacy/plan.py) and a site's budget (client/budget.py,
    which decides, with the site's own budget and history) all call it."""
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    return calibrate_noise_multiplier(privacy.target_epsilon, privacy.target_delta, sample_rate, total_steps,
                                      privacy.accountant, prior_history=prior_history or None)


# Above this many planned steps PRV is calibrated by a bisection through compute_epsilon (whose
# PRV calls are guarded, see _composed_epsilon) below RDP's noise, not by Opacus's own search:
# that search tries small noise multipliers first, and at a hostile run's rounds = 10^6 one such
# PRV call asked for a 5.8 GiB array (the site process was killed). Runs of realistic length stay
# on Opacus's search, with the numbers they always had.
PRV_SEARCH_MAX_STEPS = 10_000


@lru_cache(maxsize=256)
def _calibrate_fresh(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                     mechanism: Mechanism) -> float:
    # A pure function that takes seconds with PRV; a simulated site process calibrates the same
    # numbers every round (and for every site of the same size), so remember them.
    def opacus(accountant: str) -> float:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=total_steps, accountant=accountant, epsilon_tolerance=0.005))

    if mechanism != "prv" or total_steps <= PRV_SEARCH_MAX_STEPS:
        return opacus(mechanism)
    if total_steps > PRV_MAX_STEPS:  # compute_epsilon answers with RDP's bound there: calibrate to it
        return opacus("rdp")
    # RDP's epsilon bounds PRV's from above, so RDP's noise is enough for PRV: search below it.
    high = opacus("rdp")
    low = 0.0
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if compute_epsilon([(mid, sample_rate, total_steps)], delta, "prv") <= target_epsilon \
            else (mid, high)
    return high


def _calibrate_after(target_epsilon, delta, sample_rate, total_steps, mechanism, prior) -> float:
    # Bisection on sigma with the prior history composed in (Opacus's helper knows no prior).
    def eps(sigma: float) -> float:
        return compute_epsilon([*prior, (sigma, sample_rate, total_steps)], delta, mechanism)

    if compute_epsilon(prior, delta, mechanism) >= target_epsilon:
        raise ValueError("the prior history alone already reaches the target epsilon")
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise ValueError("no noise multiplier reaches the target epsilon")
    while high - low > 1e-3 * max(high, 1e-3):
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high
