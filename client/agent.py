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
from fedtune.privacy.accounting import AccountantHistory, calibrate_noise_multiplier
from fedtune.training.trainer import LocalTrainer

from .ledger import RunLedger
from .runtime import SiteRuntime, site_runtime, state_dir
from .settings import SiteSettings

log = logging.getLogger(__name__)


def round_seed(base: int, site_id: str, rnd: int) -> int:
    # Same seeds, same run: a resumed run draws exactly what an uninterrupted one would.
    return (base * 1_000_003 + sum(map(ord, site_id)) * 7_919 + rnd) % (2**31)


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

    def _noise_multiplier(self, site: SiteRuntime, instr: RoundInstructions) -> float:
        """Calibrated for every planned round of the run (rounds x local steps), never per round."""
        privacy = site.cfg.privacy
        if privacy.noise_multiplier is not None:
            return privacy.noise_multiplier
        return calibrate_noise_multiplier(
            privacy.target_epsilon, privacy.target_delta, site.sample_rate(),
            instr.rounds * site.steps_per_round(), privacy.accountant,
        )

    # -- Flower ---------------------------------------------------------------------------

    def fit(self, parameters, config):
        instr = RoundInstructions.from_record(config)
        site = self._runtime(instr, parameters)
        cfg = site.cfg
        if instr.max_weight and site.num_train > instr.max_weight:
            raise ValueError(
                f"{self.settings.site_id}: {site.num_train} examples exceed SecAgg+ max_weight {instr.max_weight}"
            )
        steps = site.steps_per_round()
        seed = round_seed(cfg.train.seed, self.settings.site_id, instr.round)
        torch.manual_seed(seed)
        ledger = None
        history = None
        noise = 0.0
        if cfg.privacy.enabled:
            folder = state_dir(self.settings, instr.site_state_root)
            ledger = RunLedger(folder, instr.run_id, cfg.privacy.accountant) if folder else None
            history = ledger.load() if ledger else AccountantHistory(mechanism=cfg.privacy.accountant)
            noise = self._noise_multiplier(site, instr)
        trainer = LocalTrainer(
            site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
            site.device, site.precision, noise_multiplier=noise, history=history, seed=seed,
            proximal_mu=instr.proximal_mu,
        )
        result = trainer.train(steps, lr_step_offset=(instr.round - 1) * steps, lr_total_steps=instr.rounds * steps,
                               desc=self.settings.site_id)
        site.model = trainer.close()
        if ledger is not None:
            ledger.save(result.history, ledger.rounds() + [instr.round])
        arrays = list(get_adapter_arrays(site.model).values())
        report = SiteReport(
            site=self.settings.site_id,
            train_loss=result.train_loss,
            epsilon=result.epsilon(cfg.privacy.target_delta) if cfg.privacy.enabled else math.inf,
            delta=cfg.privacy.target_delta,
            noise_multiplier=noise,
            max_grad_norm=cfg.privacy.max_grad_norm,
            sample_rate=result.sample_rate,
            steps=result.history.steps if result.history is not None else result.steps,
            accountant=cfg.privacy.accountant if cfg.privacy.enabled else "none",
            clipped_values=_clipped(arrays, site.num_train, instr),
        )
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


def _clipped(arrays: list[np.ndarray], num_examples: int, instr: RoundInstructions) -> int:
    """Values SecAgg+ would silently clip: it clips (examples / max_weight) * value."""
    if not instr.clipping_range or not instr.max_weight:
        return 0
    scale = num_examples / instr.max_weight
    return int(sum(int((np.abs(a) * scale > instr.clipping_range).sum()) for a in arrays))
