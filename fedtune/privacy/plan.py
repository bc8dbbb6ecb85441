"""``fedtune privacy plan``: what a planned run would cost each site, before it runs."""

from __future__ import annotations

from pydantic import BaseModel

from fedtune.config import FedTuneConfig
from fedtune.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from fedtune.training.trainer import dp_sample_rate, steps_per_epoch


class SitePlan(BaseModel):
    site: str
    examples: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    total_steps: int
    noise_multiplier: float
    epsilon: float
    prior_epsilon: float = 0.0
    target_epsilon: float


def plan_site(cfg: FedTuneConfig, site: str, examples: int,
              prior_history: list[tuple[float, float, int]] | None = None) -> SitePlan:
    """Noise for all planned rounds x local steps at this site, and the epsilon it gives,
    both from the accountant (after what the site already spent, if ``prior_history``)."""
    privacy, fed = cfg.privacy, cfg.federation
    q = dp_sample_rate(examples, cfg.train.batch_size)
    per_round = cfg.train.epochs * steps_per_epoch(examples, cfg.train.batch_size)
    total = per_round * fed.rounds
    prior = list(prior_history or [])
    noise = privacy.noise_multiplier
    if noise is None:
        noise = calibrate_noise_multiplier(privacy.target_epsilon, privacy.target_delta, q, total,
                                           privacy.accountant, prior_history=prior or None)
    return SitePlan(
        site=site, examples=examples, batch_size=cfg.train.batch_size, sample_rate=q,
        steps_per_round=per_round, total_steps=total, noise_multiplier=noise,
        epsilon=compute_epsilon([*prior, (noise, q, total)], privacy.target_delta, privacy.accountant),
        prior_epsilon=compute_epsilon(prior, privacy.target_delta, privacy.accountant) if prior else 0.0,
        target_epsilon=privacy.target_epsilon,
    )


def format_plans(plans: list[SitePlan]) -> str:
    header = ["site", "examples", "batch", "q", "steps/round", "steps", "noise", "epsilon", "target"]
    rows = [[p.site, str(p.examples), str(p.batch_size), f"{p.sample_rate:.4g}", str(p.steps_per_round),
             str(p.total_steps), f"{p.noise_multiplier:.4g}", f"{p.epsilon:.4g}", f"{p.target_epsilon:g}"]
            for p in plans]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])
