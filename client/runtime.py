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

from fedtune.audit.canaries import join_canaries
from fedtune.config import FedTuneConfig
from fedtune.data import LabelMap, SiteData, pad_collate
from fedtune.data.cleaning import CleaningReport, clean_rows
from fedtune.data.readers import read_table
from fedtune.data.membership import split_rows
from fedtune.data.site import data_columns, encode_rows
from fedtune.data.units import UnitReport, bound_units, duplicate_report
from fedtune.local import Site, seed_everything
from fedtune.model import build_model, load_tokenizer, resolve_device, uses_chat_template
from fedtune.privacy.ledger import dataset_fingerprint
from fedtune.training.precision import resolve_precision
from fedtune.training.auto import resolve_train
from fedtune.training.trainer import dp_sample_rate, steps_per_epoch

from .secret import membership_key
from .settings import SiteSettings, site_test_fraction

log = logging.getLogger("fedtune.client.site")


@dataclass
class SiteRuntime(Site):
    """A ``Site`` (model, data, device) plus the site agent's own settings."""

    settings: Optional[SiteSettings] = None
    fingerprint: str = ""   # content hash of the site's data: the privacy ledger's key
    units: Optional[UnitReport] = None  # rows bounded per privacy unit (privacy-unit setting)

    @property
    def rows_per_unit(self) -> int:
        """k: the most rows one unit contributes (1: every row is its own unit)."""
        return self.units.max_rows_per_unit if self.units is not None else 1

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    def steps_per_round(self) -> int:
        return self.cfg.train.epochs * steps_per_epoch(self.num_train, self.cfg.train.batch_size)

    def sample_rate(self) -> float:
        return dp_sample_rate(self.num_train, self.cfg.train.batch_size)



_CACHE: dict[tuple, SiteRuntime] = {}
BUILT = "site built for a run"


def _file_version(settings: SiteSettings) -> Optional[tuple]:
    """The site's data file as the warm site last read it; raises when the file is gone (a site
    admin who withdrew the data: nothing trains on the rows kept in memory)."""
    if settings.simulated or settings.data_path is None:
        return None
    st = Path(settings.data_path).stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def site_runtime(config_toml: str, settings: SiteSettings, state_folder: Optional[Path] = None) -> SiteRuntime:
    """The site for this run config, built once and kept warm while the config, the site's
    settings and its data file stay the same (a changed file is read again, under its own
    fingerprint in the ledger)."""
    key = (config_toml, settings.model_dump_json(), str(state_folder), _file_version(settings))
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per process: drop the previous run's model
        _CACHE[key] = _build(config_toml, settings, state_folder)
        # Counted by the deployment tests: once per site and run config, however many messages.
        log.info("%s: %s (base model loaded; kept for this run's next messages)", settings.site_id, BUILT)
    return _CACHE[key]


def site_config(config_toml: str, settings: SiteSettings) -> FedTuneConfig:
    """The run's config as this site reads it (its own file and device win)."""
    raw = tomllib.loads(config_toml)
    # The site's own settings win over what the coordinator sent.
    data = raw.setdefault("data", {})
    if not settings.simulated:
        # The site's own file, not the built-in demo rows: otherwise data_columns() ignores the
        # text/label columns and the site would always read "text" and "label".
        data.pop("builtin", None)
        data["train"] = str(settings.data_path)
    # Columns and labels are the run's names; a deployed site answers only runs whose names are
    # its own (client/policy.py's check_shares), checked before any row is read.
    if settings.device is not None:
        raw.setdefault("train", {})["device"] = settings.device
    raw.setdefault("train", {})["progress"] = False  # many sites share one terminal in simulation
    return FedTuneConfig.model_validate(raw)


def site_training_rows(cfg: FedTuneConfig, settings: SiteSettings, config_toml: str,
                       state_folder: Optional[Path]) -> int:
    """How many training rows this site has for ``cfg`` (its columns, declared labels, privacy
    unit and keyed-hash split, exactly as training draws them): for the pre-flight's coarse
    SecAgg+ bucket, never sent as a number."""
    rows, source, _ = _site_rows(cfg, settings, config_toml, state_folder)
    train, _ = _split(cfg, settings, rows, source, state_folder)
    return len(train)


def _split(cfg: FedTuneConfig, settings: SiteSettings, rows: pd.DataFrame, source: str,
           state_folder: Optional[Path]) -> tuple[pd.DataFrame, Optional[pd.DataFrame]]:
    """Training and test rows: the site's own split by keyed hash (fedtune/data/membership.py):
    no other row moves when one is added or removed, and for a deployed site nothing the
    coordinator sends moves it. An audit's canaries (fedtune/audit/canaries.py; simulated sites
    only) join the training rows here, after the site's own selection, so that they are sampled,
    bucketed for SecAgg+ and accounted as its rows."""
    cols = data_columns(cfg.data, cfg.model.task)
    train, test = split_rows(rows, cols, site_test_fraction(settings, cfg.federation.site_test_fraction),
                             membership_key(settings, cfg.train.seed, state_folder), source)
    return join_canaries(train, cols, settings.site_id, settings.simulated), test


def _site_rows(cfg: FedTuneConfig, settings: SiteSettings, config_toml: str,
               state_folder: Optional[Path] = None) -> tuple[pd.DataFrame, str, Optional[UnitReport]]:
    cols = data_columns(cfg.data, cfg.model.task)
    if settings.simulated:
        from fedtune.federation.dataset import federated_rows_from_toml

        rows = federated_rows_from_toml(config_toml)
        return rows.sites[settings.partition_id], f"partition {settings.partition_id}", None
    path = settings.data_path
    unit = [settings.privacy_unit] if settings.privacy_unit else []
    rows, cleaning = clean_rows(read_table(path, settings.data_format), cols + unit, str(path))
    rows = _declared_labels_only(rows, cfg, settings)
    if not settings.privacy_unit:
        _report_duplicates(rows, cols, cleaning.duplicates_dropped, settings.site_id)
        return rows, str(path), None
    from .secret import site_key

    if state_folder is None:
        raise RuntimeError("bounding rows per privacy unit needs the site's state folder (its secret key)")
    rows, units = bound_units(rows, settings.privacy_unit, settings.max_rows_per_unit, site_key(state_folder),
                              cols, str(path))
    log.info("%s: %s", settings.site_id, units.summary())
    if settings.privacy_unit not in cols:
        rows = rows.drop(columns=[settings.privacy_unit])
    return rows, str(path), units


def _declared_labels_only(rows: pd.DataFrame, cfg: FedTuneConfig, settings: SiteSettings) -> pd.DataFrame:
    """A classification site's rows whose label is one it declared; the others are left out of
    training and evaluation and counted in the site's own log (never sent)."""
    if cfg.model.task != "sequence-classification" or settings.label_set is None:
        return rows
    keep = rows[settings.label_column].astype(str).isin(settings.label_set)
    if not keep.all():
        log.warning("%s: %d of %d rows have a label outside the declared set (%s) and are left out",
                    settings.site_id, int((~keep).sum()), len(rows), ", ".join(settings.label_set))
    return rows[keep]


def _report_duplicates(rows: pd.DataFrame, cols: list[str], dropped: int, site_id: str) -> None:
    """Before training, without an identifier column: say how many rows repeat others."""
    report = duplicate_report(rows, cols)
    report = report.model_copy(update={"exact": report.exact + dropped, "rows": report.rows + dropped})
    if report.any:
        log.warning("%s: %s (exact duplicates are dropped before training)", site_id, report.summary())


def _build(config_toml: str, settings: SiteSettings, state_folder: Optional[Path] = None) -> SiteRuntime:
    cfg = site_config(config_toml, settings)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one simulated site per core: avoid oversubscription
    tokenizer = load_tokenizer(cfg.model)
    rows, source, units = _site_rows(cfg, settings, config_toml, state_folder)
    cols = data_columns(cfg.data, cfg.model.task)
    fingerprint = dataset_fingerprint(
        settings.data_path if not settings.simulated else ["\t".join(r) for r in rows[cols].itertuples(index=False)]
    )
    label_map = LabelMap(cfg.data.labels) if cfg.data.labels else None
    rows, test = _split(cfg, settings, rows, source, state_folder)
    chat = uses_chat_template(cfg.model, tokenizer)
    mk = lambda df: encode_rows(df, cols, cfg.model.task, tokenizer, cfg.model.max_length, label_map, source, chat)  # noqa: E731
    data = SiteData(
        train=mk(rows),
        eval=mk(test) if test is not None else None,
        label_map=label_map,
        reports={"train": CleaningReport(rows_read=len(rows), rows_kept=len(rows))},
    )
    # train.batch_size / learning_rate = "auto": derived here, from this site's rows and its own
    # privacy terms (client/policy.py), before anything (steps per round, sample rate, noise)
    # depends on them. A run the site refuses is refused in fit(), with the ledger at hand.
    from .policy import BudgetRefusal, run_terms, site_policy

    try:
        privacy = run_terms(site_policy(settings, cfg), cfg.privacy, len(data.train),
                            settings.site_id).privacy_config(cfg.privacy)
    except BudgetRefusal as refusal:  # said now, before training; fit() refuses with the ledger at hand
        log.warning("%s", refusal)
        privacy = cfg.privacy
    resolved = resolve_train(cfg.train, len(data.train), privacy, cfg.federation.rounds)
    cfg = cfg.model_copy(update={"train": resolved.train})
    if privacy.enabled:  # the site's own warning when its rows leave too little signal
        from fedtune.privacy.plan import plan_site

        site_cfg = cfg.model_copy(update={"privacy": privacy})
        for warning in plan_site(site_cfg, settings.site_id, len(data.train)).warnings:
            log.warning("%s", warning)
    id2label = dict(enumerate(label_map.labels)) if label_map is not None else None
    model = build_model(cfg.model, cfg.lora, tokenizer, id2label, device, cfg.train.seed)
    return SiteRuntime(cfg, data, model, pad_collate(tokenizer.pad_token_id), device, precision, tokenizer=tokenizer,
                       settings=settings, fingerprint=fingerprint, units=units)
