"""A site's own settings, from Flower's node config (``flower-supernode --node-config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class SiteSettings(BaseModel):
    """Node-config keys (kebab-case on the command line) a site admin sets."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    site_id: str = Field(alias="site-id")
    data_path: Optional[Path] = Field(None, alias="data-path")
    data_format: str = Field("auto", alias="data-format")
    text_column: Optional[str] = Field(None, alias="text-column")
    label_column: Optional[str] = Field(None, alias="label-column")
    test_fraction: Optional[float] = Field(None, alias="test-fraction", ge=0, lt=1)
    device: Optional[str] = None
    state_dir: Optional[Path] = Field(None, alias="state-dir")
    # A site that requires SecAgg+ refuses to send a plain update.
    require_secure_aggregation: bool = Field(True, alias="require-secure-aggregation")
    partition_id: Optional[int] = Field(None, alias="partition-id")  # simulation only
    # The site's own privacy budget (see fedtune.config.SitePrivacy); unset: the run's.
    target_epsilon: Optional[float] = Field(None, alias="target-epsilon", gt=0)
    target_delta: Optional[float] = Field(None, alias="target-delta", gt=0, lt=1)
    max_grad_norm: Optional[float] = Field(None, alias="max-grad-norm", gt=0)
    lifetime_epsilon: Optional[float] = Field(None, alias="lifetime-epsilon", gt=0)
    max_noise_multiplier: Optional[float] = Field(None, alias="max-noise-multiplier", gt=0)
    # What the site says back (client/replies.py, client/evaluation_policy.py).
    answer_evaluation: bool = Field(True, alias="answer-evaluation")
    max_evaluations_per_run: Optional[int] = Field(None, alias="max-evaluations-per-run", ge=0)  # unset: rounds
    report_train_loss: bool = Field(False, alias="report-train-loss")  # the un-noised loss: opt-in
    report_clipping: bool = Field(False, alias="report-clipping")      # SecAgg+ clipped values: opt-in
    # The unit of privacy (fedtune/data/units.py): an identifier column, at most k rows per unit.
    privacy_unit: Optional[str] = Field(None, alias="privacy-unit")
    max_rows_per_unit: int = Field(1, alias="max-rows-per-unit", ge=1)

    @property
    def simulated(self) -> bool:
        return self.data_path is None


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
