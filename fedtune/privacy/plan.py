"""``fedtune privacy plan``: what a planned run would cost each site, before it runs."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel

from fedtune.config import FedTuneConfig, SitePrivacy
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
    delta: float = 1e-5
    lifetime_epsilon: Optional[float] = None
    warnings: list[str] = []

    @property
    def fits(self) -> bool:
        over_life = self.lifetime_epsilon is not None and self.epsilon > self.lifetime_epsilon * (1 + 1e-6)
        return self.epsilon <= self.target_epsilon * (1 + 1e-6) and not over_life


def site_targets(cfg: FedTuneConfig, site: str, own: Optional[SitePrivacy] = None) -> tuple[float, float, Optional[float]]:
    """(epsilon, delta, lifetime cap) for ``site``: the stricter of the run's and the site's own
    settings (``own``, else the run config's ``federation.site_privacy[site]``)."""
    own = own if own is not None else cfg.federation.site_privacy.get(site, SitePrivacy())
    epsilon, delta = cfg.privacy.target_epsilon, cfg.privacy.target_delta
    if own.target_epsilon is not None:
        epsilon = min(epsilon, own.target_epsilon)
    if own.target_delta is not None:
        delta = min(delta, own.target_delta)
    return epsilon, delta, own.lifetime_epsilon


def delta_warning(delta: float, examples: int) -> Optional[str]:
    """A delta of 1/N or more lets a mechanism publish a whole row and still be "DP"."""
    if examples > 0 and delta >= 1.0 / examples:
        return (f"delta {delta:g} is at least 1/N for N = {examples} rows: such a guarantee allows leaking a whole "
                f"row; choose delta well below {1.0 / examples:.3g}")
    return None


def plan_site(cfg: FedTuneConfig, site: str, examples: int,
              prior_history: list[tuple[float, float, int]] | None = None,
              own: Optional[SitePrivacy] = None) -> SitePlan:
    """Noise for all planned rounds x local steps at this site, and the epsilon it gives,
    both from the accountant (after what the site already spent, if ``prior_history``), under
    the stricter of the run's and the site's own budget (``own`` or the config's
    ``federation.site_privacy``)."""
    fed = cfg.federation
    target, delta, lifetime = site_targets(cfg, site, own)
    privacy = cfg.privacy.model_copy(update={"target_epsilon": target, "target_delta": delta})
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
        target_epsilon=privacy.target_epsilon, delta=delta, lifetime_epsilon=lifetime,
        warnings=[w for w in [delta_warning(delta, examples)] if w],
    )


def format_plans(plans: list[SitePlan]) -> str:
    from fedtune.privacy.display import format_epsilon

    header = ["site", "examples", "batch", "q", "steps/round", "steps", "noise", "epsilon", "target", "delta",
              "fits"]
    rows = [[p.site, str(p.examples), str(p.batch_size), f"{p.sample_rate:.4g}", str(p.steps_per_round),
             str(p.total_steps), f"{p.noise_multiplier:.4g}", format_epsilon(p.epsilon), f"{p.target_epsilon:g}",
             f"{p.delta:g}", "yes" if p.fits else "NO: refused"]
            for p in plans]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines += [f"WARNING {p.site}: {w}" for p in plans for w in p.warnings]
    return "\n".join(lines)
