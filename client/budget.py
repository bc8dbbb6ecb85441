"""The site's own privacy budget: the noise for a run, and refusing work past the budget.

The site, not the coordinator, decides. Its settings (run budget, lifetime cap, clip norm,
delta, the most noise it accepts) come from its own node config, and what it already spent on
this data comes from its ledger, composed with the accountant.
"""

from __future__ import annotations

from typing import Optional

from fedtune.config import FedTuneConfig, PrivacyConfig, SitePrivacy
from fedtune.privacy.accounting import calibrate_noise_multiplier, compute_epsilon

from .settings import SiteSettings

History = list[tuple[float, float, int]]
_TOLERANCE = 1e-6


class BudgetRefusal(RuntimeError):
    """The site will not train: it would spend more privacy than it allows."""


def site_privacy(cfg: FedTuneConfig, settings: SiteSettings) -> tuple[PrivacyConfig, SitePrivacy]:
    """The run's [privacy] with this site's own settings applied (node config wins)."""
    own = cfg.federation.site_privacy.get(settings.site_id, SitePrivacy())
    updates = {k: v for k, v in own.model_dump().items() if v is not None}
    for key in SitePrivacy.model_fields:
        value = getattr(settings, key, None)
        if value is not None:
            updates[key] = value
    own = own.model_copy(update=updates)
    privacy = cfg.privacy.model_copy(update={
        k: getattr(own, k) for k in ("target_epsilon", "target_delta", "max_grad_norm") if getattr(own, k) is not None
    })
    return privacy, own


def choose_noise(privacy: PrivacyConfig, own: SitePrivacy, sample_rate: float, total_steps: int,
                 prior: History) -> float:
    """Noise so that all of this run's planned steps cost at most the run's budget and, with
    what the site spent before (``prior``), at most its lifetime cap; or refuse."""
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        sigma = calibrate_noise_multiplier(privacy.target_epsilon, privacy.target_delta, sample_rate,
                                           total_steps, privacy.accountant)
    lifetime = own.lifetime_epsilon
    if lifetime is not None:
        spent = compute_epsilon(prior, privacy.target_delta, privacy.accountant)
        if spent >= lifetime:
            raise BudgetRefusal(f"lifetime budget spent: epsilon {spent:.3f} of {lifetime:g} on this data")
        planned = [*prior, (sigma, sample_rate, total_steps)]
        if compute_epsilon(planned, privacy.target_delta, privacy.accountant) > lifetime:
            try:
                sigma = calibrate_noise_multiplier(lifetime, privacy.target_delta, sample_rate, total_steps,
                                                   privacy.accountant, prior_history=prior or None)
            except ValueError:
                sigma = float("inf")
    if sigma > own.max_noise_multiplier:
        raise BudgetRefusal(
            f"the run's {total_steps} planned steps fit the remaining budget only with noise multiplier "
            f"{sigma:.3g}, above this site's maximum {own.max_noise_multiplier:g}"
        )
    return sigma


def check_round(privacy: PrivacyConfig, own: SitePrivacy, spent: History, sigma: float, sample_rate: float,
                steps: int) -> Optional[float]:
    """Before a round: refuse if this round would take the site past its lifetime cap.
    Returns the epsilon the site would reach."""
    if own.lifetime_epsilon is None:
        return None
    after = compute_epsilon([*spent, (sigma, sample_rate, steps)], privacy.target_delta, privacy.accountant)
    if after > own.lifetime_epsilon * (1 + _TOLERANCE):
        raise BudgetRefusal(f"this round would bring epsilon to {after:.3f}, past the lifetime cap "
                            f"{own.lifetime_epsilon:g}")
    return after
