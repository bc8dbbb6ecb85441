"""The pre-flight before round 1: the coordinator sends the run config and its fedtune version;
each site checks the run against its own data and answers ready, or not ready with a short
reason. The reason names a config key or column of the run, never a path, a value or a count
(the full message stays in the site's log); the site also declares the power-of-two bucket of
its training rows, for SecAgg+'s max_weight (the coordinator learns its size within 2x)."""

from __future__ import annotations

import logging
import tomllib

from pydantic import ValidationError

from fedtune import __version__
from fedtune.federation.messages import _Flat

log = logging.getLogger("fedtune.site")

RECORD = "fedtune.preflight"


class PreflightRequest(_Flat):
    run_id: str
    config: str            # the run config (TOML) the rounds will send
    version: str           # the coordinator's fedtune


class PreflightReply(_Flat):
    site: str
    ready: bool
    reason: str = ""       # short, no paths or values: shown on the coordinator's console
    version: str           # the site's fedtune
    bucket: int = 0        # power of two at or above the site's training rows (0: not ready)


def weight_bucket(examples: int) -> int:
    """The power of two at or above a site's example count."""
    return 1 << max(0, int(examples) - 1).bit_length()


def check_site(request: PreflightRequest, settings) -> PreflightReply:
    """The site's answer. ``settings`` is the site's own ``SiteSettings``."""
    def refuse(reason: str, detail: str = "") -> PreflightReply:
        log.warning("pre-flight for run %s: not ready: %s%s", request.run_id, reason, f" ({detail})" if detail else "")
        return PreflightReply(site=settings.site_id, ready=False, reason=reason, version=__version__)

    cfg, problem = _site_config(request, settings)
    if cfg is None:
        return refuse(problem)
    from fedtune.data import DataError, read_table
    from fedtune.data.cleaning import clean_rows
    from fedtune.data.site import CLASSIFICATION, data_columns

    if settings.data_path is None:
        return refuse("this site has no data file (data-path)")
    try:
        table = read_table(settings.data_path, settings.data_format)
    except (DataError, OSError) as exc:
        return refuse("the site's data file cannot be read", str(exc))
    cols = data_columns(cfg.data, cfg.model.task)
    missing = [c for c in dict.fromkeys(cols) if c not in table.columns]
    if missing:
        return refuse(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}",
                      f"{settings.data_path} has {', '.join(map(str, table.columns))}")
    try:
        rows, _ = clean_rows(table, cols, str(settings.data_path))
    except DataError as exc:
        return refuse("no usable rows in the site's data", str(exc))
    if cfg.model.task == CLASSIFICATION and cfg.data.labels:
        unknown = set(rows[cols[1]]) - set(cfg.data.labels)
        if unknown:
            return refuse(f"labels in column {cols[1]!r} that the run does not know",
                          f"{sorted(unknown)[:10]} not in {cfg.data.labels}")
    # The site's own split (its fraction, its keyed hash), exactly as training will draw it.
    from fedtune.client.secret import membership_key
    from fedtune.client.settings import site_test_fraction, state_dir
    from fedtune.data.membership import split_rows

    try:
        train_rows, _ = split_rows(rows, cols, site_test_fraction(settings, cfg.federation.site_test_fraction),
                                   membership_key(settings, cfg.train.seed, state_dir(settings)),
                                   str(settings.data_path))
    except DataError as exc:
        return refuse("no training rows after the site's test split", str(exc))
    train = len(train_rows)
    # ``auto`` resolves at the site to a batch of at most its training rows (training/auto.py's
    # ladder ends at the row count), so only an explicit number can be too large.
    if isinstance(cfg.train.batch_size, int) and train < cfg.train.batch_size:
        return refuse(f"fewer training rows than train.batch_size = {cfg.train.batch_size}",
                      f"{train} training rows")
    log.info("pre-flight for run %s: ready (%d training rows)", request.run_id, train)
    return PreflightReply(site=settings.site_id, ready=True, version=__version__, bucket=weight_bucket(train))


def _site_config(request: PreflightRequest, settings):
    """The run config as this site's fedtune reads it, with the site's own column names."""
    from fedtune.config import FedTuneConfig

    versions = f"site fedtune {__version__}, coordinator fedtune {request.version}"
    try:
        raw = tomllib.loads(request.config)
    except tomllib.TOMLDecodeError:
        return None, f"the run config is not valid TOML ({versions})"
    data = raw.setdefault("data", {})
    for key, value in (("text_column", settings.text_column), ("label_column", settings.label_column)):
        if value is not None:
            data[key] = value
    try:
        return FedTuneConfig.model_validate(raw), ""
    except ValidationError as err:
        unknown = [".".join(map(str, e["loc"])) for e in err.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            return None, f"run config key {', '.join(repr(k) for k in unknown)} unknown to this site ({versions})"
        bad = [".".join(map(str, e["loc"])) for e in err.errors()]
        return None, f"run config value{'s' if len(bad) > 1 else ''} {', '.join(bad)} refused by this site ({versions})"
