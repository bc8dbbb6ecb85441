"""The schemas of what travels between coordinator and site, besides the adapter arrays.

Flower config records hold flat scalars only, so each model converts to and from a flat dict
with ``fedtune.``-prefixed keys. Everything a site reports travels in the clear (SecAgg+
protects the arrays only): keep it to aggregate scalars.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "fedtune."


class _Flat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_record(self) -> dict:
        return {PREFIX + k: v for k, v in self.model_dump().items() if v is not None}

    @classmethod
    def from_record(cls, record) -> "_Flat":
        return cls.model_validate({k[len(PREFIX):]: v for k, v in dict(record).items() if k.startswith(PREFIX)})


class RoundInstructions(_Flat):
    """Coordinator -> site, with every train and evaluate message."""

    run_id: str
    round: int = Field(ge=1)          # absolute round (continues across a resume)
    rounds: int = Field(ge=1)         # planned rounds of the whole run: privacy and LR are spread over them
    config: str                       # the resolved run config (TOML): model, LoRA, training, privacy targets
    max_weight: float = 0.0           # SecAgg+ max_weight: a site with more examples must refuse
    clipping_range: float = 0.0       # SecAgg+ clipping range, to detect values it would clip
    proximal_mu: float = 0.0
    site_state_root: str = ""         # simulation only: where simulated sites keep their state


class SiteReport(_Flat):
    """Site -> coordinator, with every train reply."""

    site: str
    train_loss: Optional[float] = None  # un-noised: sent only if the site opts in (report-train-loss)
    epsilon: float                    # this run so far, from the site's accountant
    epsilon_total: float = 0.0        # every run on this data (the site's ledger), composed
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int                        # cumulative DP steps
    accountant: Literal["prv", "rdp", "none"]
    clipped_values: Optional[int] = None  # values SecAgg+ clipped: only if the site opts in (report-clipping)
    # The unit of privacy (fedtune/data/units.py): with at most k rows per unit, the group-privacy
    # epsilon/delta of this run for one unit (one patient, say) rather than one row.
    rows_per_unit: Optional[int] = None
    epsilon_unit: Optional[float] = None
    delta_unit: Optional[float] = None


class SiteEvalReport(_Flat):
    """Site -> coordinator, with every evaluate reply: sums over the site's test rows, each with
    Gaussian noise the site calibrated and recorded in its ledger (fedtune/privacy/release.py),
    or a refusal. The coordinator divides the sums of all sites (post-processing)."""

    site: str
    declined: Optional[bool] = None   # the site's settings or its evaluation budget say no: 0 examples
    examples: Optional[float] = None  # noised number of test rows
    correct: Optional[float] = None   # classification: noised number classified correctly
    loss_sum: Optional[float] = None  # generation: noised sum of clipped per-row mean token losses
    epsilon_total: Optional[float] = None  # the site's dataset, training and evaluation, with this answer
