"""Entry point: a site's config -> cleaned, label-encoded, tokenized train/eval datasets."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from fedtune.config import DataConfig
from fedtune.data.cleaning import ROW, CleaningReport, clean_rows
from fedtune.data.demo import demo_instruction_rows, generate_demo_rows
from fedtune.data.errors import DataError
from fedtune.data.labels import LabelMap
from fedtune.data.readers import read_table
from fedtune.data.tokenization import (
    TokenizedDataset,
    encode_causal,
    encode_classification,
    encode_prompt_response,
)

log = logging.getLogger(__name__)

CLASSIFICATION = "sequence-classification"
CAUSAL = "causal-lm"


@dataclass
class SiteData:
    train: TokenizedDataset
    eval: Optional[TokenizedDataset]
    label_map: Optional[LabelMap]  # None for causal-lm
    # "train" and "eval"; with a held-out split, "eval" covers the rows taken from train.
    reports: dict[str, CleaningReport]


def load_rows(cfg: DataConfig, task: str, seed: int) -> tuple[pd.DataFrame, Optional[pd.DataFrame], str, str]:
    """Raw train rows, eval rows (None: hold out from train) and their source names."""
    if cfg.builtin == "demo":
        return pd.DataFrame(generate_demo_rows(cfg.builtin_rows, seed), dtype=str), None, "demo", "demo"
    if cfg.builtin == "demo-instructions":
        return (pd.DataFrame(demo_instruction_rows(cfg.builtin_rows, seed), dtype=str), None, "demo-instructions",
                "demo-instructions")
    if cfg.train is None:
        raise DataError('no training data: set data.train to a file (or data.builtin = "demo" for the '
                        'generated demo; with federation.partition = "files", each site has its own file)')
    train = read_table(cfg.train, cfg.format)
    if cfg.eval is None:
        return train, None, str(cfg.train), str(cfg.train)
    return train, read_table(cfg.eval, cfg.format), str(cfg.train), str(cfg.eval)


def data_columns(cfg: DataConfig, task: str) -> list[str]:
    if task == CLASSIFICATION and cfg.builtin == "demo-instructions":
        raise DataError('data.builtin = "demo-instructions" is for model.task = "causal-lm" (use "demo" to classify)')
    if task == CLASSIFICATION:
        # The demo rows have fixed column names whatever the config says for files.
        return ["text", "label"] if cfg.builtin else [cfg.text_column, cfg.label_column]
    if task == CAUSAL:
        if cfg.builtin == "demo-instructions":
            return ["prompt", "response"]
        if cfg.prompt_column is not None:
            return [cfg.prompt_column, cfg.response_column]
        return ["text"] if cfg.builtin else [cfg.text_column]
    raise ValueError(f"unknown task {task!r}; expected {CLASSIFICATION!r} or {CAUSAL!r}")


def hold_out(df: pd.DataFrame, fraction: float, seed: int, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if len(df) < 2:
        raise DataError(f"{source}: only {len(df)} usable row; need at least 2 to hold out an eval split")
    n_eval = min(len(df) - 1, max(1, round(len(df) * fraction)))
    order = np.random.default_rng(seed).permutation(len(df))
    return df.iloc[np.sort(order[n_eval:])], df.iloc[np.sort(order[:n_eval])]


def encode_rows(df, cols, task, tokenizer, max_length, label_map, source, chat: bool = False) -> TokenizedDataset:
    """Rows -> tokenized examples; ``chat``: prompts in the tokenizer's chat template."""
    rows = df[ROW].tolist()
    if task == CLASSIFICATION:
        ids = label_map.encode(df[cols[1]], rows, source, cols[1])
        return encode_classification(df[cols[0]].tolist(), ids, tokenizer, max_length, rows)
    if len(cols) == 2:
        ds = encode_prompt_response(df[cols[0]].tolist(), df[cols[1]].tolist(), tokenizer, max_length, rows, chat)
    else:
        ds = encode_causal(df[cols[0]].tolist(), tokenizer, max_length, rows)
    if (summary := ds.fit_summary(max_length)) is not None:
        log.info("%s: %s", source, summary)
    return ds


def load_site_data(
    cfg: DataConfig,
    task: str,
    tokenizer,
    max_length: int,
    seed: int = 0,
    label_map: Optional[LabelMap] = None,
    chat: bool = False,
) -> SiteData:
    cols = data_columns(cfg, task)
    train_raw, eval_raw, train_src, eval_src = load_rows(cfg, task, seed)
    train, train_report = clean_rows(train_raw, cols, train_src)
    if task == CLASSIFICATION and label_map is None:
        # From all train-file rows, before any hold-out, so a rare label cannot land only in eval.
        label_map = LabelMap.from_values(train[cols[1]])
    if eval_raw is not None:
        eval_df, eval_report = clean_rows(eval_raw, cols, eval_src)
    else:
        train, eval_df = hold_out(train, cfg.eval_fraction, seed, train_src)
        eval_report = CleaningReport(rows_read=len(eval_df), rows_kept=len(eval_df))
        train_report = train_report.model_copy(update={"held_out": len(eval_df), "rows_kept": len(train)})
    return SiteData(
        train=encode_rows(train, cols, task, tokenizer, max_length, label_map, train_src, chat),
        eval=encode_rows(eval_df, cols, task, tokenizer, max_length, label_map, eval_src, chat),
        label_map=label_map if task == CLASSIFICATION else None,
        reports={"train": train_report, "eval": eval_report},
    )
