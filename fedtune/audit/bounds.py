"""Lower bounds on epsilon from one training run's canary guesses.

An auditor inserts each of ``m`` canaries independently with probability 1/2, trains once, then
guesses ``r`` of them (the highest scores "in", the lowest "out") and gets ``v`` right. If the
training were (epsilon, delta)-DP, ``v`` could not often be large:

- Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023),
  Theorem 3.1 / Proposition 5.2: P[v correct] is at most a Binomial(r, e^eps / (1 + e^eps)) tail
  plus a term in delta. An epsilon whose p-value falls below 1 - confidence is refuted; the bound
  is the largest refuted epsilon.
- Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential Privacy in One Run" (2024): the same
  test against the whole trade-off curve of a Gaussian mechanism with that (epsilon, delta)
  (mu-GDP), which DP-SGD's guarantee is close to; tighter where there are many guesses. It refutes
  "as private as the Gaussian mechanism at (epsilon, delta)", a slightly narrower claim, and is
  reported next to the first.

Both are lower bounds from one attack at a stated confidence, not proofs of privacy, and both are
capped by the number of guesses: with r guesses all right at 95% confidence, delta 0, the
Steinke bound is logit(0.05 ** (1 / r)): 3.49 for 100 guesses, 5.81 for 1,000.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats

EPS_CEILING = 100.0  # no audit here refutes more than this (the search stops)


def _check(m: int, r: int, v: int, confidence: float) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries (got {v}, {r}, {m})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")


def steinke_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability, under (eps, delta)-DP, of at least ``v`` right among ``r`` guesses on ``m``
    canaries (Steinke et al. 2023, Proposition 5.2)."""
    q = float(special.expit(eps))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # max over i of P[v - i <= Binomial(r, q) < v] / i
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)   # i = 1 .. v
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * worst, 1.0)


def _largest_refuted(refutes, lo: float = 0.0) -> float:
    """The largest epsilon >= 0 that ``refutes(eps)`` rejects (0 where none is): ``refutes`` is
    true on [0, e*) and false above."""
    if not refutes(lo):
        return 0.0
    hi = max(1.0, 2 * lo)
    while refutes(hi):
        lo, hi = hi, 2 * hi
        if hi > EPS_CEILING:
            return EPS_CEILING
    for _ in range(40):  # bisection: the refuted set is an interval from 0
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refutes(mid) else (lo, mid)
    return lo


def steinke_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon that ``v`` right of ``r`` guesses refutes at ``confidence``."""
    _check(m, r, v, confidence)
    alpha = 1 - confidence
    return _largest_refuted(lambda eps: steinke_p_value(m, r, v, eps, delta) < alpha)


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of the mu-GDP Gaussian mechanism (Dong, Roth and Su 2022, Corollary 2.13)."""
    return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))


@lru_cache(maxsize=4096)
def gaussian_mu(eps: float, delta: float) -> float:
    """The mu whose Gaussian mechanism is exactly (eps, delta)-DP (delta grows with mu)."""
    lo, hi = 1e-6, 1.0
    while gaussian_delta(eps, hi) < delta:
        hi *= 2
        if hi > 1e4:
            return hi
    return float(optimize.brentq(lambda mu: gaussian_delta(eps, mu) - delta, lo, hi, xtol=1e-12))


def fdp_refutes(m: int, r: int, v: int, eps: float, delta: float, confidence: float) -> bool:
    """Whether ``v`` right of ``r`` guesses refutes the Gaussian trade-off curve through
    (eps, delta) at ``confidence`` (Mahloujifar et al. 2024, the recursion over the number of
    right guesses that bounds the tail of correct guesses under f-DP, with the cap at 1)."""
    alpha = 1 - confidence
    mu = gaussian_mu(eps, delta)
    # Under f-DP with f the mu-GDP curve, a set of guesses whose false share is h forces the
    # true share up to at most what the curve allows: f's inverse blow-up.
    allow = lambda x: float(stats.norm.cdf(stats.norm.ppf(x) - mu))  # noqa: E731
    right = alpha * v / m
    wrong = alpha * (r - v) / m
    for i in range(v - 1, -1, -1):
        raised = max(wrong, allow(right))
        if raised == wrong:
            break  # neither share moves again
        right = min(right + (i / (r - i)) * (raised - wrong), 1.0)
        wrong = raised
    return right + wrong > r / m


def fdp_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon whose Gaussian (eps, delta) curve ``v`` right of ``r`` refutes."""
    _check(m, r, v, confidence)
    if v == 0 or delta <= 0:
        return 0.0  # the Gaussian curve needs delta > 0; nothing right refutes nothing
    return _largest_refuted(lambda eps: fdp_refutes(m, r, v, eps, delta, confidence))


def lower_bounds(m: int, r: int, v: int, delta: float, confidence: float) -> dict[str, float]:
    """Both bounds and the larger of the two (what an audit reports)."""
    steinke = steinke_bound(m, r, v, delta, confidence)
    fdp = fdp_bound(m, r, v, delta, confidence)
    return {"steinke": steinke, "fdp": fdp, "epsilon_lower_bound": max(steinke, fdp)}
