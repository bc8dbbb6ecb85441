"""The site's privacy budget: the noise for each round, and refusing what does not fit.

The site, not the coordinator, decides (client/policy.py gives the terms). At a run's first
round the site fixes the run's plan (rounds, steps per round, sample rate, noise) and records it
in its ledger with that round. Every round, before any step, under the ledger's lock:

* this run's history plus the remaining planned rounds must fit the run budget, and the whole
  ledger for this dataset plus them must fit the lifetime cap; the noise is the plan's while the
  run follows its plan, else recalibrated with the history (more rounds, another batch size or
  number of epochs, a re-sent round: only what is left is spread over what is asked);
* a fixed noise multiplier from the run config is used only if it fits;
* the round itself, composed with the history, is checked against both before training.

What cannot fit is refused (BudgetRefusal) before any step; what is trained is appended to the
ledger before the update leaves, while the same lock is held, so two runs on one state folder
cannot both pass the cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from fedtune.config import PrivacyConfig
from fedtune.privacy.accounting import compute_epsilon, planned_noise
from fedtune.privacy.composition import sequential
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger, RunPlan

from .policy import BudgetRefusal, RunTerms, SitePolicy

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]
_TOLERANCE = 1e-9

__all__ = ["BudgetRefusal", "RoundGrant", "SiteBudget", "round_noise"]


@dataclass
class RoundGrant:
    """What the site allows for one round: train ``steps`` steps with ``noise``."""

    noise: float
    sample_rate: float
    steps: int
    delta: float                    # this run's delta
    lifetime_delta: float           # the delta the dataset's whole ledger is composed at
    accountant: str
    run_history: History            # this run before the round
    prior: History                  # every other run on this dataset
    plan: Optional[RunPlan]         # set on a run's first round: recorded with it
    evaluation: History = field(default_factory=list)  # the dataset's evaluation answers (composed in parallel)
    epsilon_run: float = math.nan   # after record()
    epsilon_total: float = math.nan  # the dataset's: max(training, evaluation) (fedtune/privacy/composition.py)
    _record: Optional[Callable[[int, float, Optional[dict]], LedgerEntry]] = field(default=None, repr=False)

    def record(self, steps: int, sample_rate: float, extra: Optional[dict] = None) -> LedgerEntry:
        """Append what was trained to the ledger (before the update leaves the site); ``extra``:
        further ledger fields (e.g. rows_per_unit)."""
        if self._record is None:
            raise RuntimeError("this grant was already recorded")
        entry, self._record = self._record(steps, sample_rate, extra), None
        spent = [*self.run_history, (self.noise, sample_rate, steps)]
        self.epsilon_run = compute_epsilon(spent, self.delta, self.accountant)
        self.epsilon_total = max(compute_epsilon(self.prior + spent, self.lifetime_delta, self.accountant),
                                 compute_epsilon(self.evaluation, self.lifetime_delta, self.accountant))
        return entry


def round_noise(terms: RunTerms, policy: SitePolicy, *, plan: Optional[RunPlan], run_rounds_done: int,
                run_history: History, prior: History, rounds: int, steps: int, sample_rate: float,
                lifetime_delta: float, site: str = "site", rows_per_unit: int = 1
                ) -> tuple[float, float, Optional[RunPlan]]:
    """(noise, the run's budget, the plan to record) for the next round, or BudgetRefusal.

    With ``rows_per_unit`` k > 1 the budgets bind the unit: a unit's (group) epsilon is k times
    a row's (fedtune.privacy.group), so each row's history is held to budget / k."""
    k = max(1, rows_per_unit)
    budget = terms.target_epsilon if plan is None else min(plan.target_epsilon, terms.target_epsilon)
    delta = terms.delta if plan is None else min(plan.delta, terms.delta)
    mech = terms.accountant
    if k > 1:
        policy = policy.model_copy(update={"lifetime_epsilon": policy.lifetime_epsilon / k})
        row_budget = budget / k
    else:
        row_budget = budget
    if not terms.private:
        return 0.0, budget, None
    if not terms.enforce and terms.fixed_noise is not None:  # the site allows what the run asks
        return terms.fixed_noise, budget, None
    if plan is None:
        remaining = max(1, rounds - run_rounds_done)
    else:
        remaining = max(1, max(plan.rounds, rounds) - run_rounds_done)
    planned = steps * remaining

    def fits(sigma: float, steps_ahead: int) -> bool:
        ahead = (sigma, sample_rate, steps_ahead)
        return (compute_epsilon([*run_history, ahead], delta, mech) <= row_budget * (1 + _TOLERANCE)
                and compute_epsilon([*prior, *run_history, ahead], lifetime_delta, mech)
                <= policy.lifetime_epsilon * (1 + _TOLERANCE))

    follows_plan = (plan is not None and rounds == plan.rounds and steps == plan.steps_per_round
                    and sample_rate == plan.sample_rate and run_rounds_done < plan.rounds)
    if terms.fixed_noise is not None:
        if not fits(terms.fixed_noise, planned):
            raise BudgetRefusal(
                f"{site}: the run's fixed noise multiplier {terms.fixed_noise:g} for {remaining} more round(s) of "
                f"{steps} steps does not fit this site's budget (run epsilon {budget:g}, lifetime "
                f"{policy.lifetime_epsilon:g}); it is used only if the whole planned run fits")
        sigma = terms.fixed_noise
    elif follows_plan and fits(plan.noise_multiplier, planned):
        sigma = plan.noise_multiplier
    else:
        _refuse_if_spent(row_budget, delta, mech, run_history, site, "this run's budget")
        _refuse_if_spent(policy.lifetime_epsilon, lifetime_delta, mech, prior + run_history, site, "the lifetime cap")
        if not fits(policy.max_noise_multiplier, planned):
            raise BudgetRefusal(
                f"{site}: {remaining} more round(s) of {steps} steps do not fit what is left of the budget even with "
                f"noise multiplier {policy.max_noise_multiplier:g}, this site's maximum")
        sigma = _calibrate(row_budget, delta, sample_rate, planned, mech, run_history, site, "this run's budget")
        if not fits(sigma, planned):  # the lifetime cap binds: more noise
            sigma = max(sigma, _calibrate(policy.lifetime_epsilon, lifetime_delta, sample_rate, planned, mech,
                                          prior + run_history, site, "the lifetime cap"))
    if sigma > policy.max_noise_multiplier:
        raise BudgetRefusal(
            f"{site}: {remaining} more round(s) of {steps} steps fit what is left of the budget only with noise "
            f"multiplier {sigma:.3g}, above this site's maximum {policy.max_noise_multiplier:g}")
    # The round itself, with everything before it (the check that makes any plan safe).
    if not fits(sigma, steps):
        raise BudgetRefusal(f"{site}: this round would take the site past its budget")
    new_plan = None
    if plan is None and run_rounds_done == 0:
        new_plan = RunPlan(rounds=rounds, steps_per_round=steps, sample_rate=sample_rate, noise_multiplier=sigma,
                           target_epsilon=budget, delta=delta)
    return sigma, budget, new_plan


def _refuse_if_spent(epsilon: float, delta: float, mech: str, history: History, site: str, what: str) -> None:
    spent = compute_epsilon(history, delta, mech)
    if spent >= epsilon * (1 - 1e-6):
        raise BudgetRefusal(f"{site}: {what} is spent (epsilon {spent:.3f} of {epsilon:g})")


def _calibrate(epsilon: float, delta: float, q: float, steps: int, mech: str, history: History, site: str,
               what: str) -> float:
    spent = compute_epsilon(history, delta, mech)
    try:  # the site's own budget and delta, through the one calibration (fedtune/privacy/accounting.py)
        return planned_noise(PrivacyConfig(target_epsilon=epsilon, target_delta=delta, accountant=mech), q, steps,
                             history)
    except ValueError:
        raise BudgetRefusal(f"{site}: what is left of {what} (epsilon {epsilon - spent:.3g}) fits no noise "
                            "multiplier") from None


class SiteBudget:
    """One site's budget on one dataset: its ledger, its policy and this run's terms."""

    def __init__(self, ledger: PrivacyLedger, dataset: str, fingerprint: Optional[str], policy: SitePolicy,
                 terms: RunTerms, site: str = "site", rows_per_unit: int = 1):
        self.ledger, self.dataset, self.fingerprint = ledger, dataset, fingerprint
        self.policy, self.terms, self.site = policy, terms, site
        self.rows_per_unit = rows_per_unit

    def dataset_delta(self, entries: list[LedgerEntry]) -> float:
        """The delta this dataset's lifetime cap is composed at: fixed at its first use (this
        run's delta, which is at most the site's own) and recorded on every entry; a ledger from
        before the record: the smallest delta any entry trained at."""
        recorded = next((e.dataset_delta for e in entries if e.dataset_delta is not None), None)
        if recorded is not None:
            return recorded
        return min([self.terms.delta, *(e.delta for e in entries)])

    def entries(self) -> list[LedgerEntry]:
        """Every entry of this dataset: its training calls and its evaluation answers."""
        return [e for e in self.ledger.entries() if e.of_dataset(self.dataset, self.fingerprint)]

    @contextmanager
    def round(self, run_id: str, rnd: int, rounds: int, steps: int, sample_rate: float) -> Iterator[RoundGrant]:
        """Hold the ledger's lock, decide the round (or refuse), and yield the grant; the caller
        trains and calls ``grant.record`` inside the ``with``."""
        with self.ledger.locked():
            entries = self.entries()
            self._warn_if_changed(entries)
            # Evaluation answers compose with training in parallel (the keyed-hash split keeps
            # test and training rows apart), sequentially where a privacy unit spans k > 1 rows
            # (fedtune/privacy/composition.py).
            trained = [e for e in entries if not e.is_evaluation]
            answers = [e for e in entries if e.is_evaluation]
            run = [e for e in trained if e.run_id == run_id]
            plan = next((e.plan for e in run if e.plan is not None), None)
            history = lambda es: [(e.noise_multiplier, e.sample_rate, e.steps) for e in es]  # noqa: E731
            prior, run_history = history([e for e in trained if e.run_id != run_id]), history(run)
            evaluation = history(answers)
            if self.rows_per_unit > 1 or sequential(entries):
                prior, evaluation = prior + evaluation, []
            lifetime_delta = self.dataset_delta(entries)
            terms = self.terms
            if terms.delta > lifetime_delta:  # never a looser delta than the dataset's
                log.info("%s: run %s asks delta %g; dataset '%s' is held to %g: clamped", self.site, run_id,
                         terms.delta, self.dataset, lifetime_delta)
                terms = terms.model_copy(update={"delta": lifetime_delta})
            if any(e.round == rnd for e in run):
                log.warning("%s: run %s round %d is already in the ledger; a re-sent round spends what is left of "
                            "the run's budget, with fresh randomness", self.site, run_id, rnd)
            noise, budget, new_plan = round_noise(
                terms, self.policy, plan=plan, run_rounds_done=len(run), run_history=run_history, prior=prior,
                rounds=rounds, steps=steps, sample_rate=sample_rate, lifetime_delta=lifetime_delta, site=self.site,
                rows_per_unit=self.rows_per_unit)
            delta = terms.delta if plan is None else min(plan.delta, terms.delta)
            grant = RoundGrant(noise=noise, sample_rate=sample_rate, steps=steps, delta=delta,
                               lifetime_delta=lifetime_delta, accountant=self.terms.accountant,
                               run_history=run_history, prior=prior, plan=new_plan, evaluation=evaluation)

            def record(done: int, q: float, extra: Optional[dict] = None) -> LedgerEntry:
                fields = {**(extra or {}), "dataset": self.dataset, "run_id": run_id, "round": rnd, "steps": done, "sample_rate": q,
                          "noise_multiplier": noise, "max_grad_norm": self.terms.max_grad_norm, "delta": delta,
                          "accountant": self.terms.accountant, "fingerprint": self.fingerprint,
                          "plan": new_plan.model_dump() if new_plan is not None else None,
                          "dataset_delta": lifetime_delta}
                return self.ledger.append({k: v for k, v in fields.items() if v is not None})

            grant._record = record
            yield grant

    def _warn_if_changed(self, entries: list[LedgerEntry]) -> None:
        last = next((e.fingerprint for e in reversed(entries) if e.fingerprint), None)
        if last is not None and self.fingerprint is not None and last != self.fingerprint:
            log.warning("%s: the data of dataset '%s' changed since its last training (content hash differs); "
                        "its lifetime cap still counts every earlier run on it", self.site, self.dataset)
