"""``train.batch_size = "auto"`` and ``train.learning_rate = "auto"``: derived at each site from
its own rows and privacy budget, and the expected noise-to-signal of one DP step.

The rule (measurements in simulations/RESULTS.md, literature in shared notes):

- batch: DP-SGD's per-step noise on the mean clipped gradient has standard deviation
  ``sigma * C / B`` against a clipped signal of at most ``C``: a noise-to-signal of
  ``sigma / B``. ``auto`` takes the smallest expected batch (the most steps) on a ladder that
  starts at ``2 * sqrt(N)`` (dp-transformers: about sqrt(N) or larger; at least 16) and doubles
  up to N whose noise multiplier, calibrated for the whole planned run (rounds x local epochs)
  at the site's budget, gives ``sigma / B <= TARGET_NOISE_TO_SIGNAL``. The target is the
  noise-to-signal at which the demo learns (0.013 at expected batch 64, 0.95 accuracy);
  large sites get about 2 * sqrt(N), small sites and small budgets larger batches.
  Without DP: 32 (the non-private batch measured on SST-2).
- learning rate (AdamW): 1e-2 with DP (10x the non-private rate, measured on the demo and
  SST-2 in simulations/RESULTS.md), 1e-3 without.

``train.class_balance = "auto"`` is resolved where the run starts (the coordinator, train-local),
from evaluation rows: reweighted where the class prior is skewed, else off
(``resolve_class_balance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config import PrivacyConfig, TrainConfig
from fedtune.privacy.accounting import planned_noise
from fedtune.training.losses import label_prior

AUTO = "auto"
# class_balance "auto" adjusts the logits when the largest class is at least this many times the
# smallest in the prior: SST-2's dev set is 1.04, a 2,000-row AG News test sample 1.13, the
# skewed sites of issue 28 2.5 and more (simulations/RESULTS.md section 13).
SKEWED_PRIOR = 1.5
TARGET_NOISE_TO_SIGNAL = 0.012   # sigma / expected batch that auto aims for (module docstring)
MIN_DP_BATCH = 16
NON_PRIVATE_BATCH = 32
DP_LEARNING_RATE = 1e-2
NON_PRIVATE_LEARNING_RATE = 1e-3


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def dp_sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate exactly as Opacus sets it (1 / batches per epoch), so that
    calibration and accounting use the same number."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def batch_ladder(num_examples: int) -> list[int]:
    start = max(MIN_DP_BATCH, int(math.ceil(2 * math.sqrt(max(1, num_examples)) / 8) * 8))
    ladder, b = [], start
    while b < num_examples:
        ladder.append(b)
        b *= 2
    ladder.append(max(1, num_examples))
    return ladder


def auto_batch_size(num_examples: int, privacy: PrivacyConfig, rounds: int, epochs: int) -> int:
    """The expected batch ``auto`` picks for a site with ``num_examples`` training rows."""
    if not privacy.enabled:
        return min(NON_PRIVATE_BATCH, max(1, num_examples))
    ladder = batch_ladder(num_examples)
    if privacy.noise_multiplier is not None:  # fixed noise: no budget to trade, take the first
        return ladder[0]
    for b in ladder:
        steps = rounds * epochs * steps_per_epoch(num_examples, b)
        sigma = planned_noise(privacy, dp_sample_rate(num_examples, b), steps)
        if sigma / b <= TARGET_NOISE_TO_SIGNAL:
            return b
    return ladder[-1]


def auto_learning_rate(private: bool) -> float:
    return DP_LEARNING_RATE if private else NON_PRIVATE_LEARNING_RATE


@dataclass(frozen=True)
class ResolvedTrain:
    train: TrainConfig          # batch_size and learning_rate are numbers
    batch_auto: bool
    learning_rate_auto: bool


def resolve_train(train: TrainConfig, num_examples: int, privacy: PrivacyConfig, rounds: int = 1) -> ResolvedTrain:
    """``train`` with any ``auto`` replaced by the numbers for this site; explicit numbers stay."""
    batch_auto, lr_auto = train.batch_size == AUTO, train.learning_rate == AUTO
    update: dict = {}
    if batch_auto:
        update["batch_size"] = auto_batch_size(num_examples, privacy, rounds, train.epochs)
    if lr_auto:
        update["learning_rate"] = auto_learning_rate(privacy.enabled)
    resolved = train.model_copy(update=update) if update else train
    return ResolvedTrain(resolved, batch_auto, lr_auto)


def noise_to_signal(noise_multiplier: float, batch_size: int) -> float:
    """Std of the DP noise on the mean clipped gradient per step (sigma * C / B) over the
    largest clipped mean-gradient signal (C): sigma / B."""
    return noise_multiplier / max(1, batch_size)


def resolve_class_balance(train: TrainConfig, task: str, label_ids, num_labels: int) -> TrainConfig:
    """``train`` with ``class_balance`` resolved (``auto`` becomes ``reweighted`` or ``off``) and,
    where balanced, ``class_prior`` from ``label_ids``: evaluation rows that cost no site any
    privacy. An explicit ``class_prior`` is kept."""
    if task != "sequence-classification" or train.class_balance == "off":
        return train.model_copy(update={"class_balance": "off"})
    prior = list(train.class_prior) or [round(p, 6) for p in label_prior(label_ids, num_labels)]
    balance = train.class_balance
    if balance == AUTO:
        balance = "reweighted" if max(prior) >= SKEWED_PRIOR * min(prior) else "off"
    return train.model_copy(update={"class_balance": balance, "class_prior": prior if balance != "off" else []})
