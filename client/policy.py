"""The site's privacy policy, and the terms on which it trains one run.

The site's own settings (node config, ``fedtune client`` flags, its settings file) are the only
source of truth. The run config is the coordinator's request: it can make a site's terms
stricter (a smaller epsilon or delta), never looser. In simulation, ``federation.site_privacy``
of the run config stands in for each simulated site's node config (the person running a
simulation owns every site), so there it sets the site's own policy.
"""

from __future__ import annotations

import logging
from typing import Optional

from pydantic import BaseModel

from fedtune.config import FedTuneConfig, PrivacyConfig

from .settings import SiteSettings

log = logging.getLogger("fedtune.client.site")

_POLICY_KEYS = ("target_epsilon", "target_delta", "max_grad_norm", "lifetime_epsilon", "max_noise_multiplier",
                "allow_non_private")
_STRICTER_IS_SMALLER = ("target_epsilon", "target_delta", "lifetime_epsilon", "max_noise_multiplier")


class BudgetRefusal(RuntimeError):
    """The site will not train: the request breaks its privacy policy or budget."""


class PolicyRefusal(BudgetRefusal):
    """The site will not train: the run asks for what its policy forbids (no DP, noise 0, a delta
    at or above 1/N). Reported to the coordinator as "refused (site policy)"."""

    public_kind = "refused (site policy)"


class SitePolicy(BaseModel):
    """What one site accepts, whatever a run asks."""

    target_epsilon: Optional[float] = None   # run budget cap (None: the run's target)
    target_delta: Optional[float] = None
    max_grad_norm: Optional[float] = None
    lifetime_epsilon: float
    max_noise_multiplier: float
    allow_non_private: bool = False

    def describe(self) -> str:
        run = f"at most {self.target_epsilon:g} per run" if self.target_epsilon is not None else "the run's target"
        dp = "NON-PRIVATE TRAINING ALLOWED (no DP guarantee)" if self.allow_non_private else "DP-SGD required"
        return (f"{dp}; epsilon {run}; lifetime cap {self.lifetime_epsilon:g} per dataset; "
                f"noise multiplier at most {self.max_noise_multiplier:g}"
                + (f"; delta {self.target_delta:g}" if self.target_delta is not None
                   else "; delta min(1e-5, 1/(10 N)) over the dataset's N rows at its first use"))


class RunTerms(BaseModel):
    """The privacy terms this site trains one run under: the run's [privacy] bounded by the site."""

    private: bool                   # DP-SGD (False only where the site allows non-private training)
    target_epsilon: float           # the run budget: min(site, run)
    delta: float                    # min(site, run)
    max_grad_norm: float
    accountant: str
    fixed_noise: Optional[float]    # the run's fixed noise multiplier, if it asked for one
    enforce: bool = True            # False only with allow_non_private

    def privacy_config(self, base: PrivacyConfig) -> PrivacyConfig:
        return base.model_copy(update={"enabled": self.private, "target_epsilon": self.target_epsilon,
                                       "target_delta": self.delta, "max_grad_norm": self.max_grad_norm})


def site_policy(settings: SiteSettings, cfg: FedTuneConfig) -> SitePolicy:
    """The site's policy: its own settings; the run config's ``site_privacy`` for this site
    only where stricter, except in simulation where it is the simulated site's own setting."""
    own = {k: getattr(settings, k) for k in _POLICY_KEYS}
    table = cfg.federation.site_privacy
    for entry in (table.get("*"), table.get(settings.site_id)):
        if entry is None:
            continue
        for key, value in entry.model_dump(exclude_none=True).items():
            if settings.simulated:
                own[key] = value
            elif key in _STRICTER_IS_SMALLER:
                own[key] = value if own[key] is None else min(own[key], value)
            # a deployed site ignores the coordinator's max_grad_norm and allow_non_private
    if settings.simulated and own["target_delta"] is None:  # the simulation's owner chose the run's delta
        own["target_delta"] = cfg.privacy.target_delta
    return SitePolicy(**own)


DEFAULT_DELTA = 1e-5


def site_delta(policy: SitePolicy, num_examples: int) -> float:
    """The delta this site holds its data to: its own ``target-delta``, else min(1e-5, 1/(10 N))
    over its N rows. At a dataset's first use it becomes the dataset's delta, recorded in the
    ledger, which every later run and the lifetime cap keep (client/budget.py)."""
    if policy.target_delta is not None:
        return policy.target_delta
    return min(DEFAULT_DELTA, 1.0 / (10 * max(1, num_examples)))


def check_request(policy: SitePolicy, privacy: PrivacyConfig, site: str = "site") -> None:
    """What the site refuses from the run's request alone, before any of its rows is read: DP
    off or noise 0 unless the site allows it."""
    if not privacy.enabled and not policy.allow_non_private:
        raise PolicyRefusal(f"{site}: the run asks to train without differential privacy; this site requires "
                            "DP-SGD (a site admin can allow non-private training with allow-non-private)")
    if privacy.noise_multiplier is not None and privacy.noise_multiplier <= 0 and not policy.allow_non_private:
        raise PolicyRefusal(f"{site}: the run asks for noise multiplier {privacy.noise_multiplier:g} (no privacy); "
                            "this site requires DP noise")


def check_shares(settings: SiteSettings, cfg: FedTuneConfig) -> None:
    """A deployed site shares only its own columns and its declared label set: a run naming
    anything else is refused whatever it asks (train, evaluate, pre-flight), before any row is
    read, so the refusal says nothing about the file (only about what the admin declared). The
    declared set in another order is the same set (the run's order sets the class ids). A
    simulated site's columns and labels are the run's: whoever simulates owns the sites."""
    if settings.simulated:
        return
    from fedtune.data.site import CAUSAL, CLASSIFICATION

    site, data, task = settings.site_id, cfg.data, cfg.model.task
    if task == CLASSIFICATION:
        asked, own = [data.text_column, data.label_column], [settings.text_column, settings.label_column]
    elif task == CAUSAL and data.prompt_column is not None:
        asked, own = [data.prompt_column, data.response_column], [settings.prompt_column, settings.response_column]
    else:
        asked, own = [data.text_column], [settings.text_column]
    if asked != own:
        raise PolicyRefusal(f"{site}: the run names columns {asked}; this site shares only {own} "
                            "(its text-column/label-column/prompt-column/response-column settings)")
    if task != CLASSIFICATION:
        return
    declared = settings.label_set
    if declared is None:
        raise PolicyRefusal(f"{site}: the run is a classification run and this site declares no label set "
                            "(its admin sets labels, e.g. --labels neg,pos)")
    if sorted(map(str, data.labels)) != sorted(declared) or len(set(data.labels)) != len(data.labels):
        raise PolicyRefusal(f"{site}: the run names labels {list(data.labels)}; this site declares "
                            f"{declared} (the same set in any order is accepted)")


def check_before_rows(settings: SiteSettings, cfg: FedTuneConfig) -> None:
    """Everything a site refuses from the run's request alone, before any of its rows is read:
    other columns or labels than its own (:func:`check_shares`), DP off or noise 0
    (:func:`check_request`). Train, evaluate and pre-flight all pass here first."""
    check_shares(settings, cfg)
    check_request(site_policy(settings, cfg), cfg.privacy, settings.site_id)


def run_terms(policy: SitePolicy, privacy: PrivacyConfig, num_examples: int, site: str = "site") -> RunTerms:
    """The terms for this run, or a refusal before any step: what :func:`check_request` refuses,
    and a delta at or above 1/N for the site's N rows. The run's delta is a request: above the
    site's it is clamped to the site's (and said so in the site's log)."""
    check_request(policy, privacy, site)
    epsilon = privacy.target_epsilon if policy.target_epsilon is None else min(policy.target_epsilon,
                                                                                privacy.target_epsilon)
    own = site_delta(policy, num_examples)
    delta = min(own, privacy.target_delta)
    if privacy.enabled and privacy.target_delta > own:
        log.info("%s: the run asks delta %g; this site's is %g: clamped to %g", site, privacy.target_delta, own, own)
    if privacy.enabled and num_examples > 0 and delta >= 1.0 / num_examples:
        raise PolicyRefusal(f"{site}: delta {delta:g} is at or above 1/N for this site's {num_examples} rows "
                            "(a delta that large allows releasing a row outright); use a smaller target_delta")
    return RunTerms(
        private=privacy.enabled, target_epsilon=epsilon, delta=delta,
        max_grad_norm=policy.max_grad_norm or privacy.max_grad_norm, accountant=privacy.accountant,
        fixed_noise=privacy.noise_multiplier, enforce=not policy.allow_non_private,
    )

