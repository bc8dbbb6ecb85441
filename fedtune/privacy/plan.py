"""``fedtune privacy plan``: what a planned run would cost each site, before it runs, what
``auto`` picks there, and whether the site has enough signal to learn under DP."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel

from fedtune.config import FedTuneConfig, SitePrivacy
from fedtune.privacy.accounting import compute_epsilon, planned_noise
from fedtune.training.auto import noise_to_signal, resolve_train
from fedtune.training.trainer import dp_sample_rate, steps_per_epoch

# Above this expected noise-to-signal per step (sigma / expected batch: the DP noise's std on
# the mean clipped gradient over the clipped signal's bound) a site is warned that it may not
# learn. Measured on the demo task (simulations/RESULTS.md, "too small to learn"): sites at
# 0.011 reach 0.95 central accuracy in 3 rounds, sites of 46-58 rows at 0.018-0.023 only 0.60.
MAX_NOISE_TO_SIGNAL = 0.015


class SitePlan(BaseModel):
    site: str
    examples: int
    batch_size: int
    batch_auto: bool = False
    learning_rate: float
    learning_rate_auto: bool = False
    sample_rate: float
    steps_per_round: int
    total_steps: int
    noise_multiplier: float
    noise_to_signal: float
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
    table = cfg.federation.site_privacy
    owns = [own] if own is not None else [o for o in (table.get("*"), table.get(site)) if o is not None]
    epsilon, delta, lifetime = cfg.privacy.target_epsilon, cfg.privacy.target_delta, None
    for o in owns:
        if o.target_epsilon is not None:
            epsilon = min(epsilon, o.target_epsilon)
        if o.target_delta is not None:
            delta = min(delta, o.target_delta)
        if o.lifetime_epsilon is not None:
            lifetime = o.lifetime_epsilon if lifetime is None else min(lifetime, o.lifetime_epsilon)
    return epsilon, delta, lifetime


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
    ``federation.site_privacy``), with ``auto`` batch and learning rate resolved for the site."""
    fed = cfg.federation
    target, delta, lifetime = site_targets(cfg, site, own)
    privacy = cfg.privacy.model_copy(update={"target_epsilon": target, "target_delta": delta})
    resolved = resolve_train(cfg.train, examples, privacy, fed.rounds)
    train = resolved.train
    q = dp_sample_rate(examples, train.batch_size)
    per_round = train.epochs * steps_per_epoch(examples, train.batch_size)
    total = per_round * fed.rounds
    prior = list(prior_history or [])
    noise = planned_noise(privacy, q, total, prior)
    expected_batch = min(examples, train.batch_size)
    plan = SitePlan(
        site=site, examples=examples, batch_size=train.batch_size, batch_auto=resolved.batch_auto,
        learning_rate=train.learning_rate, learning_rate_auto=resolved.learning_rate_auto, sample_rate=q,
        steps_per_round=per_round, total_steps=total, noise_multiplier=noise,
        noise_to_signal=noise_to_signal(noise, expected_batch),
        epsilon=compute_epsilon([*prior, (noise, q, total)], privacy.target_delta, privacy.accountant),
        prior_epsilon=compute_epsilon(prior, privacy.target_delta, privacy.accountant) if prior else 0.0,
        target_epsilon=privacy.target_epsilon, delta=delta, lifetime_epsilon=lifetime,
    )
    plan.warnings = [w for w in [delta_warning(delta, examples)] if w]
    if privacy.enabled:
        plan.warnings += too_small_warnings(cfg, plan)
    return plan


def too_small_warnings(cfg: FedTuneConfig, plan: SitePlan) -> list[str]:
    """What to tell a site whose rows, budget and rounds leave too little signal per DP step."""
    if plan.noise_to_signal <= MAX_NOISE_TO_SIGNAL:
        return []
    helps = [f"more rows (noise-to-signal falls about as 1/sqrt(rows); {plan.examples} now)"]
    if cfg.federation.rounds > 1:
        helps.append(f"fewer rounds (federation.rounds = {cfg.federation.rounds})")
    if plan.batch_size < plan.examples:
        helps.append(f"a larger expected batch (train.batch_size = {plan.batch_size}; up to the site's rows)")
    if not cfg.lora.freeze_a:
        helps.append("FFA-LoRA (lora.freeze_a = true: half the noised adapter values)")
    if cfg.lora.r > 4:
        helps.append(f"a smaller LoRA rank (lora.r = {cfg.lora.r})")
    helps.append(f"a larger epsilon (privacy.target_epsilon = {plan.target_epsilon:g}), if the site allows it")
    if cfg.model.task == "sequence-classification" and cfg.train.class_balance == "off":
        helps.append("on skewed labels, train.class_balance = \"reweighted\" (a model that learns little "
                     "otherwise answers only the majority class)")
    done = ""
    if plan.batch_auto:
        done = (f" train.batch_size = \"auto\" already takes every row ({plan.examples}) in each step, the largest "
                f"batch there is, with {plan.steps_per_round} step(s) a round." if plan.batch_size >= plan.examples else
                f" train.batch_size = \"auto\" chose the expected batch {plan.batch_size}.")
    return [
        f"{plan.site}: too little signal to learn under DP: expected noise-to-signal per step "
        f"{plan.noise_to_signal:.3f} (noise multiplier {plan.noise_multiplier:.3g} / expected batch "
        f"{plan.batch_size}) is above {MAX_NOISE_TO_SIGNAL:g}.{done} What would help: " + "; ".join(helps) + "."
    ]


def class_balance_line(requested, train, task: str, eval_rows: Optional[int]) -> Optional[str]:
    """What ``train.class_balance`` does in the planned run: ``requested`` the config's train
    section, ``train`` that resolved from the coordinator's ``eval_rows`` evaluation rows where
    known (else the same). None for a task without classes."""
    if task != "sequence-classification":
        return None
    if train.class_balance == "auto":
        return ("class balance: auto (reweighted if the coordinator's evaluation rows are skewed 1.5x or more; "
                "decided when the run starts)")
    if train.class_balance == "off":
        return "class balance: off" + (f" (auto: the coordinator's {eval_rows} evaluation rows are balanced)"
                                       if requested.class_balance == "auto" else "")
    if not train.class_prior:
        return f"class balance: {train.class_balance}, class prior from the coordinator's evaluation rows when the run starts"
    prior = ", ".join(f"{p:.3g}" for p in train.class_prior)
    source = ("as configured" if requested.class_prior or eval_rows is None
              else f"from the coordinator's {eval_rows} evaluation rows")
    return f"class balance: {train.class_balance}, class prior [{prior}] {source}"


def format_plans(plans: list[SitePlan]) -> str:
    from fedtune.privacy.display import format_epsilon

    header = ["site", "examples", "batch", "lr", "q", "steps/round", "steps", "noise", "noise/signal",
              "epsilon", "target", "delta", "fits"]
    rows = [[p.site, str(p.examples), f"{p.batch_size}{' (auto)' if p.batch_auto else ''}",
             f"{p.learning_rate:g}{' (auto)' if p.learning_rate_auto else ''}", f"{p.sample_rate:.4g}",
             str(p.steps_per_round), str(p.total_steps), f"{p.noise_multiplier:.4g}", f"{p.noise_to_signal:.4f}",
             format_epsilon(p.epsilon), f"{p.target_epsilon:g}", f"{p.delta:g}", "yes" if p.fits else "NO: refused"]
            for p in plans]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])
    warnings = [w if w.startswith(f"{p.site}:") else f"{p.site}: {w}" for p in plans for w in p.warnings]
    return table + ("\n\nWARNING " + "\nWARNING ".join(warnings) if warnings else "")


def simulated_site_sizes(cfg: FedTuneConfig) -> list[tuple[str, int]]:
    """(site id, training rows) of each simulated site: its partition less its local test split."""
    from fedtune.federation.dataset import federated_rows, site_id

    fraction = cfg.federation.site_test_fraction
    sizes = []
    for i, rows in enumerate(federated_rows(cfg).sites):
        held = max(1, round(len(rows) * fraction)) if fraction > 0 and len(rows) >= 2 else 0
        sizes.append((site_id(i), len(rows) - held))
    return sizes


def plan_sites(cfg: FedTuneConfig, sizes: list[tuple[str, int]], own: Optional[SitePrivacy] = None) -> list[SitePlan]:
    """One plan per site, each under the stricter of the run's and the site's own budget (``own``
    for every site, e.g. from a site's settings file; else ``federation.site_privacy``)."""
    return [plan_site(cfg, site, n, own=own) for site, n in sizes]
