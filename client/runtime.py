"""What a site keeps between rounds in one process: tokenizer, its data, the model with LoRA.

The base model is loaded once per process and per run config; every round only loads the
global adapter arrays into it.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from fedtune.config import FedTuneConfig
from fedtune.data import LabelMap, SiteData, pad_collate
from fedtune.data.cleaning import CleaningReport, clean_rows
from fedtune.data.readers import read_table
from fedtune.data.site import data_columns, encode_rows, hold_out
from fedtune.local import Site, seed_everything
from fedtune.model import build_model, load_tokenizer, resolve_device
from fedtune.privacy.ledger import dataset_fingerprint
from fedtune.training.precision import resolve_precision
from fedtune.training.auto import resolve_train
from fedtune.training.trainer import dp_sample_rate, steps_per_epoch

from .settings import SiteSettings


@dataclass
class SiteRuntime(Site):
    """A ``Site`` (model, data, device) plus the site agent's own settings."""

    settings: Optional[SiteSettings] = None
    fingerprint: str = ""   # content hash of the site's data: the privacy ledger's key

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    def steps_per_round(self) -> int:
        return self.cfg.train.epochs * steps_per_epoch(self.num_train, self.cfg.train.batch_size)

    def sample_rate(self) -> float:
        return dp_sample_rate(self.num_train, self.cfg.train.batch_size)


log = logging.getLogger(__name__)

_CACHE: dict[tuple, SiteRuntime] = {}


def site_runtime(config_toml: str, settings: SiteSettings) -> SiteRuntime:
    key = (config_toml, settings.model_dump_json())
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per process: drop the previous run's model
        _CACHE[key] = _build(config_toml, settings)
    return _CACHE[key]


def _site_config(config_toml: str, settings: SiteSettings) -> FedTuneConfig:
    raw = tomllib.loads(config_toml)
    # The site's own settings win over what the coordinator sent.
    data = raw.setdefault("data", {})
    for key, value in (("text_column", settings.text_column), ("label_column", settings.label_column)):
        if value is not None:
            data[key] = value
    if settings.device is not None:
        raw.setdefault("train", {})["device"] = settings.device
    raw.setdefault("train", {})["progress"] = False  # many sites share one terminal in simulation
    return FedTuneConfig.model_validate(raw)


def _site_rows(cfg: FedTuneConfig, settings: SiteSettings, config_toml: str) -> tuple[pd.DataFrame, str]:
    if settings.simulated:
        from fedtune.federation.dataset import federated_rows_from_toml

        rows = federated_rows_from_toml(config_toml)
        return rows.sites[settings.partition_id], f"partition {settings.partition_id}"
    path = settings.data_path
    cols = data_columns(cfg.data, cfg.model.task)
    rows, _ = clean_rows(read_table(path, settings.data_format), cols, str(path))
    return rows, str(path)


def _build(config_toml: str, settings: SiteSettings) -> SiteRuntime:
    cfg = _site_config(config_toml, settings)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one simulated site per core: avoid oversubscription
    tokenizer = load_tokenizer(cfg.model)
    rows, source = _site_rows(cfg, settings, config_toml)
    cols = data_columns(cfg.data, cfg.model.task)
    fingerprint = dataset_fingerprint(
        settings.data_path if not settings.simulated else ["\t".join(r) for r in rows[cols].itertuples(index=False)]
    )
    label_map = LabelMap(cfg.data.labels) if cfg.data.labels else None
    test_fraction = settings.test_fraction if settings.test_fraction is not None else cfg.federation.site_test_fraction
    test = None
    if test_fraction > 0 and len(rows) >= 2:
        rows, test = hold_out(rows, test_fraction, cfg.train.seed, source)
    mk = lambda df: encode_rows(df, cols, cfg.model.task, tokenizer, cfg.model.max_length, label_map, source)  # noqa: E731
    data = SiteData(
        train=mk(rows),
        eval=mk(test) if test is not None else None,
        label_map=label_map,
        reports={"train": CleaningReport(rows_read=len(rows), rows_kept=len(rows))},
    )
    # train.batch_size / learning_rate = "auto": derived here, from this site's rows and its own
    # privacy budget, before anything (steps per round, sample rate, noise) depends on them.
    from .budget import site_privacy

    privacy = site_privacy(cfg, settings)[0]
    resolved = resolve_train(cfg.train, len(data.train), privacy, cfg.federation.rounds)
    cfg = cfg.model_copy(update={"train": resolved.train})
    if privacy.enabled:  # the site's own warning when its rows leave too little signal
        from fedtune.privacy.plan import plan_site

        for warning in plan_site(cfg.model_copy(update={"privacy": privacy}), settings.site_id, len(data.train)).warnings:
            log.warning("%s", warning)
    id2label = dict(enumerate(label_map.labels)) if label_map is not None else None
    model = build_model(cfg.model, cfg.lora, tokenizer, id2label, device, cfg.train.seed)
    return SiteRuntime(cfg, data, model, pad_collate(tokenizer.pad_token_id), device, precision, settings, fingerprint)


def state_dir(settings: SiteSettings, site_state_root: str) -> Path:
    """Where the site keeps its privacy ledger: its own state-dir, the simulation's folder for
    simulated sites, else ~/.fedtune/sites/<site-id>."""
    if settings.state_dir is not None:
        return settings.state_dir
    if site_state_root:
        return Path(site_state_root) / settings.site_id
    return Path.home() / ".fedtune" / "sites" / settings.site_id
