"""The pre-flight before round 1: the coordinator sends the run config and its fedtune version;
each site answers ready or not ready, nothing more. A not-ready reason is one of: the run config
cannot be read by this site's fedtune (naming the run's key), ``refused (site policy)`` (the run
names other columns or labels than the site's, or asks for no DP), or ``not ready (site
data)``; never a path, a value, a column of the file or a count (the full message stays in the
site's log). A ready site declares the power-of-two bucket of its training rows, for SecAgg+'s
max_weight: its own coarse figure (within 2x), the same whatever the run asks."""

from __future__ import annotations

import logging
import tomllib

from pydantic import ValidationError

from fedtune import __version__
from fedtune.federation.messages import _Flat

log = logging.getLogger("fedtune.site")

RECORD = "fedtune.preflight"
SITE_POLICY = "refused (site policy)"   # the run asks what the site's own settings refuse
SITE_DATA = "not ready (site data)"     # the site's own file, under its own settings: details in its log


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
    """The site's answer: ready or not, nothing more. ``settings`` is the site's own
    ``SiteSettings``. In order: the run config as this site's fedtune reads it; the site's policy
    on the request alone (its own columns and declared labels, DP on: client/policy.py), refused
    as ``refused (site policy)``; then the site's own data under its own columns, labels and
    split, which no value of the run (batch size, labels, columns) can change: "ready" with the
    power-of-two bucket of its training rows (for SecAgg+), or the generic "not ready (site
    data)". The details stay in the site's log."""
    def refuse(reason: str, detail: str = "") -> PreflightReply:
        log.warning("pre-flight for run %s: not ready: %s%s", request.run_id, reason, f" ({detail})" if detail else "")
        return PreflightReply(site=settings.site_id, ready=False, reason=reason, version=__version__)

    cfg, problem = _site_config(request, settings)
    if cfg is None:
        return refuse(problem)
    from fedtune.client.policy import BudgetRefusal, check_before_rows

    try:
        check_before_rows(settings, cfg)
    except BudgetRefusal as refusal:
        return refuse(SITE_POLICY, str(refusal))
    if settings.data_path is None:
        return refuse(SITE_DATA, "this site has no data file (data-path)")
    from fedtune.client.runtime import site_config, site_training_rows
    from fedtune.client.settings import state_dir

    try:
        train = site_training_rows(site_config(request.config, settings), settings, request.config,
                                   state_dir(settings))
    except Exception as exc:  # noqa: BLE001 - the file, its columns, its rows: the site's own, said locally
        return refuse(SITE_DATA, f"{type(exc).__name__}: {exc}")
    if train < 1:
        return refuse(SITE_DATA, "no training rows after the site's own split")
    log.info("pre-flight for run %s: ready (%d training rows)", request.run_id, train)
    return PreflightReply(site=settings.site_id, ready=True, version=__version__, bucket=weight_bucket(train))


def _site_config(request: PreflightRequest, settings):
    """The run config as this site's fedtune reads it (its columns checked by the site's policy)."""
    from fedtune.config import FedTuneConfig

    versions = f"site fedtune {__version__}, coordinator fedtune {request.version}"
    try:
        raw = tomllib.loads(request.config)
    except tomllib.TOMLDecodeError:
        return None, f"the run config is not valid TOML ({versions})"
    try:
        return FedTuneConfig.model_validate(raw), ""
    except ValidationError as err:
        unknown = [".".join(map(str, e["loc"])) for e in err.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            return None, f"run config key {', '.join(repr(k) for k in unknown)} unknown to this site ({versions})"
        bad = [".".join(map(str, e["loc"])) for e in err.errors()]
        return None, f"run config value{'s' if len(bad) > 1 else ''} {', '.join(bad)} refused by this site ({versions})"
