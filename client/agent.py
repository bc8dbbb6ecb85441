"""The site's Flower client: train the global adapter with DP-SGD, evaluate it locally.

What leaves the site: the adapter arrays (masked by SecAgg+), the example count and the
scalar metrics of ``SiteReport`` / ``SiteEvalReport``. Never text, token ids or gradients.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.client import NumPyClient

from fedtune.adapters import get_adapter_arrays, set_adapter_arrays, trainable_parameters
from fedtune.evaluation import evaluate
from fedtune.federation.messages import RoundInstructions, SiteEvalReport, SiteReport
from fedtune.privacy.accounting import AccountantHistory
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training.trainer import LocalTrainer

from .budget import BudgetRefusal, SiteBudget
from .policy import run_terms, site_policy
from .runtime import SiteRuntime, site_runtime, state_dir
from .secret import dp_seeds, site_key
from .settings import SiteSettings

log = logging.getLogger(__name__)


class SiteClient(NumPyClient):
    def __init__(self, settings: SiteSettings):
        self.settings = settings

    # -- helpers --------------------------------------------------------------------------

    def _runtime(self, instr: RoundInstructions, parameters: list[np.ndarray]) -> SiteRuntime:
        site = site_runtime(instr.config, self.settings)
        names = list(trainable_parameters(site.model))
        if len(names) != len(parameters):
            raise ValueError(f"{self.settings.site_id}: got {len(parameters)} arrays, the adapter has {len(names)}")
        set_adapter_arrays(site.model, dict(zip(names, parameters)))
        return site

    def fit(self, parameters, config):
        instr = RoundInstructions.from_record(config)
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
        report = SiteReport(
            site=self.settings.site_id,
            train_loss=result.train_loss,
            epsilon=epsilon_run,
            epsilon_total=epsilon_total,
            delta=grant.delta,
            noise_multiplier=noise,
            max_grad_norm=privacy.max_grad_norm,
            sample_rate=result.sample_rate,
            steps=sum(s for _, _, s in this_run) + result.steps,
            accountant=privacy.accountant if privacy.enabled else "none",
            clipped_values=_clipped(arrays, site.num_train, instr),
        )
        return arrays, site.num_train, report.to_record()

    def _train(self, site: SiteRuntime, instr: RoundInstructions, budget: SiteBudget, folder, steps: int):
        cfg = site.cfg
        # Under the ledger's lock from the budget check to the ledger entry (see client/budget.py).
        with budget.round(instr.run_id, instr.round, instr.rounds, steps, site.sample_rate()) as grant:
            privacy = budget.terms.privacy_config(cfg.privacy)
            seeds = dp_seeds(site_key(folder), instr.run_id, instr.round)  # fresh for every attempt
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
            grant.record(result.steps, result.sample_rate)
        return grant, result, privacy

    def _budget(self, site: SiteRuntime, folder) -> SiteBudget:
        policy = site_policy(self.settings, site.cfg)
        try:
            terms = run_terms(policy, site.cfg.privacy, site.num_train, self.settings.site_id)
        except BudgetRefusal as refusal:
            log.warning("%s refuses: %s", self.settings.site_id, refusal)
            raise
        return SiteBudget(PrivacyLedger(folder / "privacy-ledger.jsonl"), self.settings.dataset_name,
                          site.fingerprint, policy, terms, self.settings.site_id)

    def evaluate(self, parameters, config):
        instr = RoundInstructions.from_record(config)
        site = self._runtime(instr, parameters)
        if site.data.eval is None or len(site.data.eval) == 0:
            return 0.0, 0, SiteEvalReport(site=self.settings.site_id).to_record()
        metrics = evaluate(site.model, site.data.eval, site.collate, site.cfg.model.task, site.device,
                           site.precision, site.cfg.train.eval_batch_size)
        report = SiteEvalReport(site=self.settings.site_id, accuracy=metrics.get("accuracy"),
                                f1=metrics.get("f1"), perplexity=metrics.get("perplexity"))
        return float(metrics["loss"]), len(site.data.eval), report.to_record()


def _clipped(arrays: list[np.ndarray], num_examples: int, instr: RoundInstructions) -> int:
    """Values SecAgg+ would silently clip: it clips (examples / max_weight) * value."""
    if not instr.clipping_range or not instr.max_weight:
        return 0
    scale = num_examples / instr.max_weight
    return int(sum(int((np.abs(a) * scale > instr.clipping_range).sum()) for a in arrays))
