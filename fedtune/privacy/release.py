"""A site's evaluation answer, released with differential privacy: the Gaussian mechanism on
sums of bounded per-row values.

An answer is two sums over the site's test rows: how many rows there are, and either how many
the adapter classifies correctly (classification) or the sum of per-row losses clipped to
``[0, LOSS_BOUND]`` (generation: the mean token loss of each row). Adding or removing one test
row moves the first by 1 and the second by at most its bound. Divided by their bounds, the d = 2
sums have L2 sensitivity sqrt(d); each gets Gaussian noise of standard deviation
``z * sqrt(d)`` (times its bound once scaled back), so the answer is one Gaussian mechanism with
noise multiplier z: the accountant composes it like a DP-SGD step at sample rate 1, and the
site's ledger records it as ``(z, 1.0, 1 step)``.

The coordinator divides the sums it gets from all sites (accuracy = correct / rows), which is
post-processing. F1 is not answered (its per-class counts would need more noised sums for a
metric the coordinator's own central evaluation already gives exactly).

The noise is drawn from a generator seeded by the operating system's secret randomness, fresh
for every answer. ``_NOISE`` exists for the tests only: with it off the statistical check of
the mechanism must fail (tests/test_evaluation_privacy.py).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from pydantic import BaseModel

CLASSIFICATION = "sequence-classification"
LOSS_BOUND = 10.0  # nats: a row's mean token loss is clipped to [0, 10] before it is summed
_NOISE = True      # tests only (see the module text)


class EvaluationSums(BaseModel):
    """What one evaluation answer says: sums over the site's test rows (noised when released)."""

    examples: float
    correct: Optional[float] = None    # classification
    loss_sum: Optional[float] = None   # generation: sum of clipped per-row mean token losses


def bounds(task: str) -> dict[str, float]:
    """Each released sum and how much one test row can move it."""
    return {"examples": 1.0, "correct": 1.0} if task == CLASSIFICATION else {"examples": 1.0, "loss_sum": LOSS_BOUND}


def exact_sums(task: str, correct: Optional[np.ndarray] = None, row_loss: Optional[np.ndarray] = None
               ) -> EvaluationSums:
    """The un-noised sums from per-row values (never sent)."""
    if task == CLASSIFICATION:
        correct = np.asarray(correct, dtype=float)
        return EvaluationSums(examples=float(len(correct)), correct=float(np.clip(correct, 0, 1).sum()))
    row_loss = np.asarray(row_loss, dtype=float)
    return EvaluationSums(examples=float(len(row_loss)),
                          loss_sum=float(np.clip(row_loss, 0.0, LOSS_BOUND).sum()))


def noise_std(task: str, noise_multiplier: float) -> dict[str, float]:
    """The standard deviation of each released sum for noise multiplier z."""
    b = bounds(task)
    return {k: noise_multiplier * math.sqrt(len(b)) * v for k, v in b.items()}


def release(task: str, sums: EvaluationSums, noise_multiplier: float,
            rng: Optional[np.random.Generator] = None) -> EvaluationSums:
    """The sums with Gaussian noise (see the module text); ``rng``: the tests' generator, else a
    fresh one from the operating system's secret randomness."""
    if noise_multiplier <= 0:
        raise ValueError("an evaluation answer needs noise multiplier > 0")
    rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
    out = sums.model_dump()
    for key, std in noise_std(task, noise_multiplier).items():
        out[key] = float(out[key]) + (float(rng.normal(0.0, std)) if _NOISE else 0.0)
    return EvaluationSums(**out)


def combine(answers: list[EvaluationSums]) -> Optional[dict]:
    """The coordinator's federated metrics from the sites' noised sums (post-processing): the
    sums added up, then divided; None when they hold no rows (after noise: under one)."""
    rows = sum(a.examples for a in answers)
    if not answers or rows < 1:
        return None
    out: dict = {"examples": round(rows, 1)}
    if all(a.correct is not None for a in answers):
        out["accuracy"] = min(1.0, max(0.0, sum(a.correct for a in answers) / rows))
    if all(a.loss_sum is not None for a in answers):
        out["loss"] = max(0.0, sum(a.loss_sum for a in answers) / rows)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out
