"""``fedtune train-local``: the single-site fine-tune that federated runs are compared against."""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fedtune.config import ConfigError, FedTuneConfig, ModelConfig, TrainConfig, save_config
from fedtune.data import LabelMap, SiteData, load_site_data, pad_collate
from fedtune.evaluation import evaluate, generation_scores
from fedtune.io_utils import atomic_replace_dir, atomic_write_json
from fedtune.model import build_model, load_tokenizer, resolve_device, uses_chat_template
from fedtune.privacy.accounting import AccountantHistory, PrivacySpend, planned_noise
from fedtune.training.auto import resolve_class_balance, resolve_train
from fedtune.training.precision import resolve_precision
from fedtune.training.trainer import LocalTrainer, TrainResult, dp_sample_rate, steps_per_epoch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Site:
    """Everything one site needs to train: tokenizer, tokenised data, model with LoRA."""

    cfg: FedTuneConfig
    data: SiteData
    model: torch.nn.Module
    collate: object
    device: torch.device
    precision: str
    tokenizer: object = None

    @property
    def label_map(self) -> Optional[LabelMap]:
        return self.data.label_map


def prepare_site(cfg: FedTuneConfig, label_map: Optional[LabelMap] = None) -> Site:
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    tokenizer = load_tokenizer(cfg.model)
    data = load_site_data(cfg.data, cfg.model.task, tokenizer, cfg.model.max_length, cfg.train.seed, label_map,
                          uses_chat_template(cfg.model, tokenizer))
    id2label = dict(enumerate(data.label_map.labels)) if data.label_map is not None else None
    model = build_model(cfg.model, cfg.lora, tokenizer, id2label, device, cfg.train.seed)
    return Site(cfg, data, model, pad_collate(tokenizer.pad_token_id), device, precision, tokenizer)


def privacy_spend(cfg: FedTuneConfig, result: TrainResult, history: Optional[AccountantHistory]) -> Optional[PrivacySpend]:
    if history is None:
        return None
    return PrivacySpend(
        epsilon=history.epsilon(cfg.privacy.target_delta),
        delta=cfg.privacy.target_delta,
        noise_multiplier=result.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        steps=history.steps,
        sample_rate=result.sample_rate,
        accountant=history.mechanism,
    )


MODEL_NOTE = "fedtune_model.json"  # beside the adapter: the base model as fedtune names it


def save_adapter(model: torch.nn.Module, folder: Path, model_cfg: Optional[ModelConfig] = None) -> None:
    """PEFT-format adapter (loads with PeftModel.from_pretrained), moved into place whole. With
    ``model_cfg``, also the base model's fedtune name (``fedtune generate`` loads it from there: PEFT's
    own ``base_model_name_or_path`` is this machine's folder, a cache path for a GGUF model)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if model_cfg is not None:
            (tmp / MODEL_NOTE).write_text(model_cfg.model_dump_json(indent=1) + "\n")
        atomic_replace_dir(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def with_local_class_prior(train: TrainConfig, site: Site) -> TrainConfig:
    """train-local's ``train.class_balance``, resolved from the held-out evaluation rows, which DP-SGD
    does not train on (the training rows' counts would be a release the accountant does not cover)."""
    if site.data.label_map is None or train.class_balance == "off":
        return train.model_copy(update={"class_balance": "off"})
    if site.data.eval is None:
        if train.class_balance == "auto":
            return train.model_copy(update={"class_balance": "off"})
        raise ConfigError("train.class_balance needs evaluation rows for its class prior (data.eval or "
                          "data.eval_fraction), or train.class_prior set explicitly")
    resolved = resolve_class_balance(train, "sequence-classification", (int(y) for y in site.data.eval.labels),
                                     site.data.label_map.num_labels)
    if resolved.class_balance != "off":
        log.info("train.class_balance = %s: class prior %s from %d evaluation rows", resolved.class_balance,
                 resolved.class_prior, len(site.data.eval))
    return resolved


def run_train_local(cfg: FedTuneConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    site = prepare_site(cfg)
    n = len(site.data.train)
    resolved = resolve_train(cfg.train, n, cfg.privacy)
    if resolved.batch_auto or resolved.learning_rate_auto:
        log.info("train auto: expected batch %d, learning rate %g for %d rows", resolved.train.batch_size,
                 resolved.train.learning_rate, n)
    cfg = cfg.model_copy(update={"train": with_local_class_prior(resolved.train, site)})
    site.cfg = cfg
    for name, report in site.data.reports.items():
        log.info("%s data: %s", name, report.summary())
    total_steps = cfg.train.epochs * steps_per_epoch(n, cfg.train.batch_size)
    q = dp_sample_rate(n, cfg.train.batch_size)
    noise = planned_noise(cfg.privacy, q, total_steps) if cfg.privacy.enabled else 0.0
    if cfg.privacy.enabled:
        log.info(
            "DP-SGD: noise multiplier %.4f for %d steps at sample rate %.5f (target epsilon %.2f, delta %g, %s)",
            noise, total_steps, q,
            cfg.privacy.target_epsilon, cfg.privacy.target_delta, cfg.privacy.accountant,
        )
    trainer = LocalTrainer(
        site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
        site.device, site.precision, noise_multiplier=noise,
        # DP: the Poisson sample and the noise from the OS's secure source, never the public
        # train.seed (saved in config.toml). Without DP the shuffle may follow it (reproducible).
        sample_seed=None if cfg.privacy.enabled else cfg.train.seed,
    )
    result = trainer.train(total_steps, desc="train-local")
    model = trainer.close()
    metrics: dict = {"train_loss": result.train_loss, "steps": result.steps, "train_examples": n}
    if site.data.eval is not None:
        metrics["eval"] = evaluate(
            model, site.data.eval, site.collate, cfg.model.task, site.device, site.precision, cfg.train.eval_batch_size
        )
        scores, samples = generation_scores(model, site.tokenizer, site.data.eval, cfg.eval, cfg.model.max_length,
                                            site.device, site.precision)
        metrics["eval"].update(scores)
        if samples:
            metrics["answers"] = samples
    spend = privacy_spend(cfg, result, result.history)
    metrics["privacy"] = spend.model_dump() if spend else None
    metrics["precision"] = site.precision
    metrics["device"] = str(site.device)
    metrics["seconds"] = round(time.perf_counter() - started, 2)

    save_adapter(model, out_dir / "adapter", cfg.model)
    if site.label_map is not None:
        site.label_map.save(out_dir / "label_map.json")
    save_config(cfg, out_dir / "config.toml")
    atomic_write_json(out_dir / "metrics.json", _json_safe(metrics))
    return metrics


def _json_safe(obj):
    # JSON has no inf: epsilon without noise is reported as the string "inf".
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
