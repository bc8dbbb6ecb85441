"""The site's Flower client: train the global adapter with DP-SGD, evaluate it locally.

What leaves the site: the adapter arrays (masked by SecAgg+), the example count and the
scalar metrics of ``SiteReport`` / ``SiteEvalReport``. Never text, token ids or gradients.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from flwr.client import NumPyClient

from fedtune.adapters import get_adapter_arrays, set_adapter_arrays, trainable_parameters
from fedtune.evaluation import evaluate
from fedtune.federation.messages import RoundInstructions, SiteEvalReport, SiteReport
from fedtune.privacy.accounting import AccountantHistory, compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training.trainer import LocalTrainer

from .budget import BudgetRefusal, check_round, choose_noise, site_privacy
from .runtime import SiteRuntime, site_runtime, state_dir
from .secret import round_seed, site_key
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
        cfg = site.cfg
        if instr.max_weight and site.num_train > instr.max_weight:
            raise ValueError(
                f"{self.settings.site_id}: {site.num_train} examples exceed SecAgg+ max_weight {instr.max_weight}"
            )
        steps = site.steps_per_round()
        folder = state_dir(self.settings, instr.site_state_root)
        # Secret to the site (not the coordinator's train.seed), the same again on resume.
        seed = round_seed(site_key(folder), instr.run_id, instr.round)
        torch.manual_seed(seed)
        privacy, own = site_privacy(cfg, self.settings)
        ledger = PrivacyLedger(folder / "privacy-ledger.jsonl")
        prior, this_run, noise = [], [], 0.0
        if privacy.enabled:
            entries = [e for e in ledger.entries() if e.dataset == site.fingerprint]
            prior = [_spend(e) for e in entries if e.run_id != instr.run_id]
            this_run = [_spend(e) for e in entries if e.run_id == instr.run_id]
            try:
                noise = choose_noise(privacy, own, site.sample_rate(), instr.rounds * steps, prior)
                check_round(privacy, own, prior + this_run, noise, site.sample_rate(), steps)
            except BudgetRefusal as refusal:
                # Refuse before any step: the reply is an error, so no update leaves the site.
                log.warning("%s refuses round %d: %s", self.settings.site_id, instr.round, refusal)
                raise
        trainer = LocalTrainer(
            site.model, site.data.train, site.collate, cfg.model.task, cfg.train, privacy,
            site.device, site.precision, noise_multiplier=noise, seed=seed, noise_seed=seed,
            proximal_mu=instr.proximal_mu,
            history=AccountantHistory(mechanism=privacy.accountant, history=this_run) if privacy.enabled else None,
        )
        result = trainer.train(steps, lr_step_offset=(instr.round - 1) * steps, lr_total_steps=instr.rounds * steps,
                               desc=self.settings.site_id)
        site.model = trainer.close()
        epsilon_run = epsilon_total = math.inf
        if privacy.enabled:
            # Recorded before the update is released: what leaves the site is always in the ledger.
            ledger.append({
                "dataset": site.fingerprint, "run_id": instr.run_id, "round": instr.round, "steps": result.steps,
                "sample_rate": result.sample_rate, "noise_multiplier": noise,
                "max_grad_norm": privacy.max_grad_norm, "delta": privacy.target_delta,
                "accountant": privacy.accountant,
            })
            spent_run = [*this_run, (noise, result.sample_rate, result.steps)]
            epsilon_run = compute_epsilon(spent_run, privacy.target_delta, privacy.accountant)
            epsilon_total = compute_epsilon(prior + spent_run, privacy.target_delta, privacy.accountant)
        arrays = list(get_adapter_arrays(site.model).values())
        report = SiteReport(
            site=self.settings.site_id,
            train_loss=result.train_loss,
            epsilon=epsilon_run,
            epsilon_total=epsilon_total,
            delta=privacy.target_delta,
            noise_multiplier=noise,
            max_grad_norm=privacy.max_grad_norm,
            sample_rate=result.sample_rate,
            steps=sum(s for _, _, s in this_run) + result.steps,
            accountant=privacy.accountant if privacy.enabled else "none",
            clipped_values=_clipped(arrays, site.num_train, instr),
        )
        if instr.max_weight:  # SecAgg+ quantises to 2**30 levels: float32 would round away 6 bits
            arrays = [a.astype(np.float64) for a in arrays]
        return arrays, site.num_train, report.to_record()

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


def _spend(entry) -> tuple[float, float, int]:
    return (entry.noise_multiplier, entry.sample_rate, entry.steps)


def _clipped(arrays: list[np.ndarray], num_examples: int, instr: RoundInstructions) -> int:
    """Values SecAgg+ would silently clip: it clips (examples / max_weight) * value."""
    if not instr.clipping_range or not instr.max_weight:
        return 0
    scale = num_examples / instr.max_weight
    return int(sum(int((np.abs(a) * scale > instr.clipping_range).sum()) for a in arrays))
