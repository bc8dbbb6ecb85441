"""The site's Flower client: train the global adapter with DP-SGD, evaluate it locally.

What leaves the site: the adapter arrays (masked by SecAgg+), the example count and the
scalar metrics of ``SiteReport`` / ``SiteEvalReport``. Never text, token ids or gradients. The
un-noised train loss and SecAgg+ clipping counts only if the site opts in; evaluation only as
often as the site allows; a failure only as a generic reason (client/replies.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.client import NumPyClient

from fedtune.adapters import (AdapterMismatchError, get_adapter_arrays, pack, set_adapter_arrays,
                              trainable_parameters, unpack)
from fedtune.evaluation import row_values
from fedtune.federation.messages import RoundInstructions, SiteEvalReport, SiteReport
from fedtune.privacy.accounting import AccountantHistory
from fedtune.privacy.group import group_privacy
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.release import exact_sums, release
from fedtune.training.trainer import LocalTrainer

from .budget import BudgetRefusal, SiteBudget
from .evaluation_policy import EvaluationBudget, EvaluationGrant
from .policy import check_before_rows, run_terms, site_policy
from .replies import guarded, write_site_log
from .runtime import SiteRuntime, site_config, site_runtime
from .secret import dp_seeds, public_seeds, site_key
from .settings import SiteSettings, site_test_fraction, state_dir

log = logging.getLogger(__name__)


class SiteClient(NumPyClient):
    def __init__(self, settings: SiteSettings):
        self.settings = settings

    # -- helpers --------------------------------------------------------------------------

    def _runtime(self, instr: RoundInstructions, parameters: list[np.ndarray]) -> SiteRuntime:
        site = site_runtime(instr.config, self.settings, state_dir(self.settings, instr.site_state_root))
        params = trainable_parameters(site.model)
        try:
            arrays = unpack(parameters, [tuple(p.shape) for p in params.values()])
        except AdapterMismatchError as err:
            raise AdapterMismatchError(f"{self.settings.site_id}: {err}") from None
        set_adapter_arrays(site.model, dict(zip(params, arrays)))
        return site

    def state_folder(self, config) -> Path | None:
        """Where this site keeps its ledger, log and counts (for the failure guard)."""
        try:
            return state_dir(self.settings, RoundInstructions.from_record(config).site_state_root)
        except Exception:  # noqa: BLE001 - instructions that do not parse: the site's own setting
            return self.settings.state_dir

    def _check_request(self, instr: RoundInstructions) -> None:
        """Refuse what the run's request alone breaks (other columns or labels than the site's,
        DP off, noise 0) before any row is read."""
        cfg = site_config(instr.config, self.settings)
        try:
            check_before_rows(self.settings, cfg)
        except BudgetRefusal as refusal:
            log.warning("%s refuses round %d: %s", self.settings.site_id, instr.round, refusal)
            raise

    @guarded("train")
    def fit(self, parameters, config):
        instr = RoundInstructions.from_record(config)
        self._check_request(instr)
        site = self._runtime(instr, parameters)
        if instr.max_weight and site.num_train > instr.max_weight:
            raise ValueError(
                f"{self.settings.site_id}: {site.num_train} examples exceed SecAgg+ max_weight {instr.max_weight}"
            )
        steps = site.steps_per_round()
        folder = state_dir(self.settings, instr.site_state_root)
        budget = self._budget(site, folder)  # refuses DP off, noise 0, delta >= 1/N before any step
        try:
            grant, result, privacy = self._train(site, instr, budget, folder, steps)
        except BudgetRefusal as refusal:  # raised before any step: no update leaves the site
            log.warning("%s refuses round %d: %s", self.settings.site_id, instr.round, refusal)
            raise
        noise = grant.noise
        epsilon_run, epsilon_total = grant.epsilon_run, grant.epsilon_total
        this_run = grant.run_history
        arrays = list(get_adapter_arrays(site.model).values())
        clipped = _clipped(arrays, site.num_train, instr)
        if clipped:
            log.warning("%s: %d adapter values are outside the SecAgg+ clipping range and will be clipped",
                        self.settings.site_id, clipped)
        unit = {}
        if site.rows_per_unit > 1:
            eps_k, delta_k = group_privacy(epsilon_run, privacy.target_delta, site.rows_per_unit)
            unit = {"rows_per_unit": site.rows_per_unit, "epsilon_unit": eps_k, "delta_unit": delta_k}
        report = SiteReport(
            site=self.settings.site_id,
            train_loss=result.train_loss if self.settings.report_train_loss else None,
            epsilon=epsilon_run,
            epsilon_total=epsilon_total,
            delta=grant.delta,
            noise_multiplier=noise,
            max_grad_norm=privacy.max_grad_norm,
            sample_rate=result.sample_rate,
            steps=sum(s for _, _, s in this_run) + result.steps,
            accountant=privacy.accountant if privacy.enabled else "none",
            clipped_values=clipped if self.settings.report_clipping else None,
            **unit,
        )
        if instr.max_weight:  # SecAgg+ quantises to 2**30 levels: float32 would round away 6 bits
            arrays = [a.astype(np.float64) for a in arrays]
        return pack(arrays), site.num_train, report.to_record()

    def _train(self, site: SiteRuntime, instr: RoundInstructions, budget: SiteBudget, folder, steps: int):
        cfg = site.cfg
        # Under the ledger's lock from the budget check to the ledger entry (see client/budget.py).
        with budget.round(instr.run_id, instr.round, instr.rounds, steps, site.sample_rate()) as grant:
            privacy = budget.terms.privacy_config(cfg.privacy)
            if privacy.enabled:  # secret and fresh for every attempt
                seeds = dp_seeds(site_key(folder), instr.run_id, instr.round)
            else:  # no DP (only where the site allows it): reproducible from the run's public seed
                seeds = public_seeds(cfg.train.seed, self.settings.site_id, instr.round)
            torch.manual_seed(seeds.other)
            trainer = LocalTrainer(
                site.model, site.data.train, site.collate, cfg.model.task, cfg.train, privacy,
                site.device, site.precision, noise_multiplier=grant.noise, sample_seed=seeds.sample,
                noise_seed=seeds.noise, proximal_mu=instr.proximal_mu,
                history=AccountantHistory(mechanism=privacy.accountant, history=grant.run_history)
                if privacy.enabled else None,
            )
            result = trainer.train(steps, lr_step_offset=(instr.round - 1) * steps,
                                   lr_total_steps=instr.rounds * steps, desc=self.settings.site_id)
            site.model = trainer.close()
            # Recorded before the update is released: what leaves the site is always in the ledger.
            grant.record(result.steps, result.sample_rate,
                         {"rows_per_unit": site.rows_per_unit} if site.rows_per_unit > 1 else None)
        return grant, result, privacy

    def _budget(self, site: SiteRuntime, folder) -> SiteBudget:
        policy = site_policy(self.settings, site.cfg)
        try:
            terms = run_terms(policy, site.cfg.privacy, site.num_train, self.settings.site_id)
        except BudgetRefusal as refusal:
            log.warning("%s refuses: %s", self.settings.site_id, refusal)
            raise
        return SiteBudget(PrivacyLedger(folder / "privacy-ledger.jsonl"), self.settings.dataset_name,
                          site.fingerprint, policy, terms, self.settings.site_id, rows_per_unit=site.rows_per_unit)

    @guarded("evaluate")
    def evaluate(self, parameters, config):
        """A noised answer recorded in the ledger, or a declined one (client/evaluation_policy.py)."""
        instr = RoundInstructions.from_record(config)
        self._check_request(instr)  # other columns or labels, DP off: refused before any row is read
        folder = state_dir(self.settings, instr.site_state_root)
        site = self._runtime(instr, parameters)
        budget = EvaluationBudget(PrivacyLedger(folder / "privacy-ledger.jsonl"), self.settings.dataset_name,
                                  site.fingerprint, answer_evaluation=self.settings.answer_evaluation,
                                  max_evaluations=self.settings.max_evaluations,
                                  lifetime_epsilon=site_policy(self.settings, site.cfg).lifetime_epsilon,
                                  rows_per_unit=site.rows_per_unit)
        task = site.cfg.model.task
        holds_out = site_test_fraction(self.settings, site.cfg.federation.site_test_fraction) > 0
        with budget.answer(instr.run_id, instr.round) as grant:
            if grant.answer and not holds_out:  # a setting, not a count: nothing to answer, nothing spent
                grant = EvaluationGrant(False, "this site holds out no test rows (test-fraction 0)")
            if not grant.answer:
                # Declined before the coordinator's adapter touches the site's test rows.
                log.info("%s declines evaluation (round %d): %s", self.settings.site_id, instr.round, grant.reason)
                write_site_log(folder, f"declined evaluation, run {instr.run_id} round {instr.round}: {grant.reason}")
                return 0.0, 0, SiteEvalReport(site=self.settings.site_id, declined=True).to_record()
            test = site.data.eval if site.data.eval is not None else []
            values = row_values(site.model, test, site.collate, task, site.device, site.precision,
                                site.cfg.train.eval_batch_size) if len(test) else {}
            exact = exact_sums(task, values.get("correct", []), values.get("loss", []))
            noised = release(task, exact, grant.noise)
            grant.record()  # in the ledger before the answer leaves the site
        examples = max(0.0, noised.examples)
        loss = noised.loss_sum / examples if noised.loss_sum is not None and examples >= 1 else 0.0
        report = SiteEvalReport(site=self.settings.site_id, examples=noised.examples, correct=noised.correct,
                                loss_sum=noised.loss_sum, epsilon_total=grant.epsilon_total)
        return float(loss), int(round(examples)), report.to_record()


def _clipped(arrays: list[np.ndarray], num_examples: int, instr: RoundInstructions) -> int:
    """Values SecAgg+ would silently clip: it clips (examples / max_weight) * value."""
    if not instr.clipping_range or not instr.max_weight:
        return 0
    scale = num_examples / instr.max_weight
    return int(sum(int((np.abs(a) * scale > instr.clipping_range).sum()) for a in arrays))
