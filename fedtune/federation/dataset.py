"""Which rows each simulated site holds and which the coordinator evaluates on.

In a simulation one dataset (or one file per site) is split across the sites; every process
recomputes the same split from the config and seed (the usual Flower simulation pattern), so
no site's rows are ever shipped anywhere. In a deployment a site reads only its own file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import pandas as pd

from fedtune.config import FedTuneConfig
from fedtune.data import DataError, LabelMap, read_table
from fedtune.data.cleaning import clean_rows
from fedtune.data.site import CLASSIFICATION, data_columns, hold_out, load_rows
from fedtune.federation.partition import partition_rows


@dataclass
class FederatedRows:
    sites: list[pd.DataFrame]      # cleaned rows per site, in site order
    central: pd.DataFrame          # the coordinator's evaluation rows
    central_source: str
    columns: list[str]
    label_map: Optional[LabelMap]  # None for causal LM


def site_id(index: int) -> str:
    return f"site-{index}"


@lru_cache(maxsize=2)
def federated_rows_from_toml(config_toml: str) -> FederatedRows:
    # Cached per process: a simulated site process serves many rounds of the same run.
    import tomllib

    return federated_rows(FedTuneConfig.model_validate(tomllib.loads(config_toml)))


def federated_rows(cfg: FedTuneConfig) -> FederatedRows:
    fed, task, seed = cfg.federation, cfg.model.task, cfg.train.seed
    cols = data_columns(cfg.data, task)
    if fed.partition == "files":
        sites = [clean_rows(read_table(path, cfg.data.format), cols, str(path))[0] for path in fed.site_files]
        if cfg.data.eval is None:
            raise DataError("federation.partition = 'files' needs data.eval: the coordinator's evaluation file")
        central, _ = clean_rows(read_table(cfg.data.eval, cfg.data.format), cols, str(cfg.data.eval))
        central_source = str(cfg.data.eval)
    else:
        train_raw, eval_raw, train_src, eval_src = load_rows(cfg.data, task, seed)
        rows, _ = clean_rows(train_raw, cols, train_src)
        if eval_raw is None:
            rows, central = hold_out(rows, cfg.data.eval_fraction, seed, train_src)
        else:
            central, _ = clean_rows(eval_raw, cols, eval_src)
        central_source = eval_src
        label_col = cols[1] if task == CLASSIFICATION else cols[0]
        if task != CLASSIFICATION and fed.partition != "iid":
            raise DataError(f"federation.partition = {fed.partition!r} splits by label: use 'iid' for causal-lm")
        sites = partition_rows(rows, fed.sites, fed.partition, label_col, fed.alpha, fed.labels_per_site, seed)
    label_map = None
    if task == CLASSIFICATION:
        label_map = LabelMap(cfg.data.labels) if cfg.data.labels else LabelMap.from_values(
            pd.concat([s[cols[1]] for s in sites])
        )
        # An evaluation label that no site has is an error before round 1, naming the row.
        label_map.encode(central[cols[1]], central["_row"].tolist(), central_source, cols[1])
    return FederatedRows(sites, central, central_source, cols, label_map)
