"""``fedtune privacy plan``: what a planned run would cost each site, before it runs, what
``auto`` picks there, and whether the site has enough signal to learn under DP."""

from __future__ import annotations

from pydantic import BaseModel

from fedtune.config import FedTuneConfig
from fedtune.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
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
    warnings: list[str] = []


def plan_site(cfg: FedTuneConfig, site: str, examples: int,
              prior_history: list[tuple[float, float, int]] | None = None) -> SitePlan:
    """Noise for all planned rounds x local steps at this site, and the epsilon it gives,
    both from the accountant (after what the site already spent, if ``prior_history``)."""
    privacy, fed = cfg.privacy, cfg.federation
    resolved = resolve_train(cfg.train, examples, privacy, fed.rounds)
    train = resolved.train
    q = dp_sample_rate(examples, train.batch_size)
    per_round = train.epochs * steps_per_epoch(examples, train.batch_size)
    total = per_round * fed.rounds
    prior = list(prior_history or [])
    noise = privacy.noise_multiplier
    if noise is None:
        noise = calibrate_noise_multiplier(privacy.target_epsilon, privacy.target_delta, q, total,
                                           privacy.accountant, prior_history=prior or None)
    expected_batch = min(examples, train.batch_size)
    plan = SitePlan(
        site=site, examples=examples, batch_size=train.batch_size, batch_auto=resolved.batch_auto,
        learning_rate=train.learning_rate, learning_rate_auto=resolved.learning_rate_auto, sample_rate=q,
        steps_per_round=per_round, total_steps=total, noise_multiplier=noise,
        noise_to_signal=noise_to_signal(noise, expected_batch),
        epsilon=compute_epsilon([*prior, (noise, q, total)], privacy.target_delta, privacy.accountant),
        prior_epsilon=compute_epsilon(prior, privacy.target_delta, privacy.accountant) if prior else 0.0,
        target_epsilon=privacy.target_epsilon,
    )
    plan.warnings = too_small_warnings(cfg, plan) if privacy.enabled else []
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
    return [
        f"{plan.site}: too little signal to learn under DP: expected noise-to-signal per step "
        f"{plan.noise_to_signal:.3f} (noise multiplier {plan.noise_multiplier:.3g} / expected batch "
        f"{plan.batch_size}) is above {MAX_NOISE_TO_SIGNAL:g}. What would help: " + "; ".join(helps) + "."
    ]


def format_plans(plans: list[SitePlan]) -> str:
    header = ["site", "examples", "batch", "lr", "q", "steps/round", "steps", "noise", "noise/signal",
              "epsilon", "target"]
    rows = [[p.site, str(p.examples), f"{p.batch_size}{' (auto)' if p.batch_auto else ''}",
             f"{p.learning_rate:g}{' (auto)' if p.learning_rate_auto else ''}", f"{p.sample_rate:.4g}",
             str(p.steps_per_round), str(p.total_steps), f"{p.noise_multiplier:.4g}", f"{p.noise_to_signal:.4f}",
             f"{p.epsilon:.4g}", f"{p.target_epsilon:g}"]
            for p in plans]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])
    warnings = [w for p in plans for w in p.warnings]
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


def plan_sites(cfg: FedTuneConfig, sizes: list[tuple[str, int]]) -> list[SitePlan]:
    """One plan per site, each under the site's own budget where the config sets one."""
    plans = []
    for site, n in sizes:
        own = cfg.federation.site_privacy.get(site)
        site_cfg = cfg
        if own is not None:
            update = {k: getattr(own, k) for k in ("target_epsilon", "target_delta", "max_grad_norm")
                      if getattr(own, k) is not None}
            site_cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update=update)})
        plans.append(plan_site(site_cfg, site, n))
    return plans
