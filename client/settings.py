"""A site's own settings, from Flower's node config (``flower-supernode --node-config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


DEFAULT_LIFETIME_EPSILON = 10.0
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_MAX_NOISE = 20.0
DEFAULT_MAX_EVALUATIONS = 50


class SiteSettings(BaseModel):
    """Node-config keys (kebab-case on the command line) a site admin sets."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    site_id: str = Field(alias="site-id")
    data_path: Optional[Path] = Field(None, alias="data-path")
    data_format: str = Field("auto", alias="data-format")
    # The columns this site shares (client/policy.py's check_columns): a deployed site answers only
    # runs that name exactly these; a simulated site takes the run's (its owner's) columns.
    text_column: str = Field("text", alias="text-column")
    label_column: str = Field("label", alias="label-column")
    prompt_column: str = Field("prompt", alias="prompt-column")        # generation with prompt/response
    response_column: str = Field("response", alias="response-column")
    # The label set the site's admin declares (comma-separated), never read from the file at run
    # time: a classification run must name exactly this set (in any order); rows with other labels
    # are left out and counted in the site's log. Unset: the site answers no classification run.
    labels: Optional[str] = None
    # The share of the site's rows in its local test split (by keyed hash: fedtune/data/membership.py).
    # Unset: 0.2 for a deployed site, whatever the run asks; a simulated site takes the run's.
    test_fraction: Optional[float] = Field(None, alias="test-fraction", ge=0, lt=1)
    device: Optional[str] = None
    state_dir: Optional[Path] = Field(None, alias="state-dir")
    # A site that requires SecAgg+ refuses to send a plain update.
    require_secure_aggregation: bool = Field(True, alias="require-secure-aggregation")
    # The fewest sites in this site's SecAgg+ neighbour set, itself included (client/secagg_policy.py):
    # 2 means at least one other site's mask hides its update.
    secagg_min_neighbours: int = Field(2, alias="secagg-min-neighbours", ge=2)
    partition_id: Optional[int] = Field(None, alias="partition-id")  # simulation only
    # The site's own privacy policy (client/policy.py). The run config can only make it stricter.
    # Run budget: the smaller of this and the run's target_epsilon (unset: the run's).
    target_epsilon: Optional[float] = Field(None, alias="target-epsilon", gt=0)
    # Delta: the smaller of this and the run's (unset: the run's); at or above 1/rows: refused.
    target_delta: Optional[float] = Field(None, alias="target-delta", gt=0, lt=1)
    max_grad_norm: Optional[float] = Field(None, alias="max-grad-norm", gt=0)
    # The cap over every run on this site's dataset, composed from its ledger. Finite by default.
    lifetime_epsilon: float = Field(DEFAULT_LIFETIME_EPSILON, alias="lifetime-epsilon", gt=0)
    max_noise_multiplier: float = Field(DEFAULT_MAX_NOISE, alias="max-noise-multiplier", gt=0)
    # Train without DP (privacy.enabled = false), with noise 0, or past the budget: only when the
    # site itself allows it (tests, audits). The run config alone never can.
    allow_non_private: bool = Field(False, alias="allow-non-private")
    # The name the lifetime cap follows (default: the data file's name, or the simulated site's id):
    # adding rows to the file does not reset it.
    dataset: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    # What the site says back (client/replies.py, client/evaluation_policy.py). Evaluation answers
    # are noised and recorded in the ledger; at most this many per dataset over all runs, each with
    # the noise that makes them all together fit lifetime-epsilon.
    answer_evaluation: bool = Field(True, alias="answer-evaluation")
    max_evaluations: int = Field(DEFAULT_MAX_EVALUATIONS, alias="max-evaluations", ge=0)
    report_train_loss: bool = Field(False, alias="report-train-loss")  # the un-noised loss: opt-in
    report_clipping: bool = Field(False, alias="report-clipping")      # SecAgg+ clipped values: opt-in
    # The unit of privacy (fedtune/data/units.py): an identifier column, at most k rows per unit.
    privacy_unit: Optional[str] = Field(None, alias="privacy-unit")
    max_rows_per_unit: int = Field(1, alias="max-rows-per-unit", ge=1)
    # The fedtune app versions whose runs this site answers (comma-separated; unset: the installed
    # fedtune's). The code that answers is always the installed fedtune (client/approval.py).
    accept_app_versions: Optional[str] = Field(None, alias="accept-app-versions")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value) -> Optional[str]:
        if value is None:
            return None
        names = [v.strip() for v in str(value).split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"labels must be distinct, non-empty names separated by commas (got {value!r})")
        return ",".join(names)

    @property
    def simulated(self) -> bool:
        return self.data_path is None

    @property
    def label_set(self) -> Optional[list[str]]:
        """The declared labels, in the admin's order (None: none declared)."""
        return None if self.labels is None else self.labels.split(",")

    @property
    def dataset_name(self) -> str:
        if self.dataset is not None:
            return self.dataset
        return self.site_id if self.data_path is None else Path(self.data_path).stem


def site_test_fraction(settings: SiteSettings, requested: float) -> float:
    """The share of rows the site holds out: its own setting. The run's ``site_test_fraction`` is
    only a request, which a deployed site ignores (a coordinator that could move the split could
    choose which rows are trained on); in a simulation whoever runs it owns the sites, so the
    run's fraction is their setting."""
    if settings.test_fraction is not None:
        return settings.test_fraction
    return requested if settings.simulated else DEFAULT_TEST_FRACTION


def settings_from_node_config(node_config: dict) -> SiteSettings:
    cfg = dict(node_config)
    if "partition-id" in cfg:  # Flower's simulation engine: the site is one partition
        pid = int(cfg["partition-id"])
        return SiteSettings(**{"site-id": f"site-{pid}", "partition-id": pid, "require-secure-aggregation": False})
    cfg.pop("num-partitions", None)
    if "data-path" not in cfg:
        raise ValueError("site agent: node config needs data-path (the site's data file)")
    cfg.setdefault("site-id", Path(str(cfg["data-path"])).stem)
    return SiteSettings.model_validate(cfg)


def state_dir(settings: SiteSettings, site_state_root: str = "") -> Path:
    """Where the site keeps its privacy ledger and DP key: its own state-dir, else
    ~/.fedtune/sites/<site-id>. The coordinator's ``site_state_root`` is used for simulated sites
    only (their state lives in the simulation's folder); a deployed site never lets the
    coordinator move its ledger (a fresh folder would be an empty ledger)."""
    if settings.state_dir is not None:
        return settings.state_dir
    if site_state_root and settings.simulated:
        return Path(site_state_root) / settings.site_id
    return Path.home() / ".fedtune" / "sites" / settings.site_id
