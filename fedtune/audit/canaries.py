"""Audit canaries: made by the auditor, joined to one simulated site's training rows.

Canaries are rows unlikely under any real data (random letter strings, or random words of a small
vocabulary; for classification a random label, for generation a random response). Each is included independently with
probability 1/2, from the operating system's secure random source; only the included ones are
handed to the site, through a file named in the site processes' environment (``CANARY_ENV``),
never through the run config or anything the coordinator sees. The site joins them after its
own selection (cleaning, deduplication, unit bounding and its test split) in the one place
where its rows are built (``fedtune/client/runtime.py``), so they are trained on, sampled and
accounted for as its own rows. A deployed site never reads them.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from fedtune.data.cleaning import ROW

CANARY_ENV = "FEDTUNE_AUDIT_CANARIES"
FIRST_ROW = 1_000_000_001   # canary row numbers, far from any file's (errors name the row)
WORDS_PER_TEXT = 4

log = logging.getLogger("fedtune.audit")


class CanaryRows(BaseModel):
    """What the audited site is handed: its name and the included canaries, by column."""

    model_config = ConfigDict(extra="forbid")

    site: str
    columns: list[str]
    rows: list[list[str]]


def vocabulary_words(tokenizer, limit: int = 20_000) -> list[str]:
    """Whole alphabetic words of the model's own vocabulary (each one token or few)."""
    words = set()
    for token in list(tokenizer.get_vocab())[: limit * 4]:
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if word.isascii() and word.isalpha() and len(word) >= 3 and word.lower() == word:
            words.add(word)
        if len(words) >= limit:
            break
    if len(words) < 8:
        raise ValueError(f"the tokenizer has only {len(words)} whole words: too few to write canaries")
    return sorted(words)


def make_canaries(count: int, tokenizer, task: str, columns: Sequence[str], labels: Optional[Sequence[str]],
                  seed: Optional[int] = None) -> pd.DataFrame:
    """``count`` distinct canary rows with the run's columns: texts of random letter strings where
    the tokenizer spells them with its own sub-word pieces, else random words of its vocabulary;
    for classification a random label from ``labels``. Their content is public; only which of
    them were trained on is secret."""
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    words = vocabulary_words(tokenizer)
    spelled = _spells_without_unknowns(tokenizer, rng)
    texts: set[str] = set()
    while len(texts) < count:
        if spelled:  # random letters: sub-word pieces that carry no topic, so no class pulls at them
            texts.add(" ".join(_letters(rng) for _ in range(WORDS_PER_TEXT)))
        else:        # a small vocabulary: random whole words of it
            texts.add(" ".join(rng.choice(words) for _ in range(WORDS_PER_TEXT)))
    texts_list = sorted(texts)
    rng.shuffle(texts_list)
    cols = list(columns)
    if task == "sequence-classification":
        if not labels:
            raise ValueError("classification canaries need the run's labels")
        data = {cols[0]: texts_list, cols[1]: [rng.choice(list(labels)) for _ in texts_list]}
    elif len(cols) == 2:  # prompt / response: the response is what the loss is on
        prompts = [" ".join(rng.choice(words) for _ in range(4)) for _ in texts_list]
        data = {cols[0]: prompts, cols[1]: texts_list}
    else:
        data = {cols[0]: texts_list}
    df = pd.DataFrame(data, dtype=str)
    df[ROW] = np.arange(FIRST_ROW, FIRST_ROW + len(df))
    return df


def _letters(rng) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 7)))


def _spells_without_unknowns(tokenizer, rng) -> bool:
    """Whether the tokenizer spells random letter strings with its own pieces (a real model's
    sub-word vocabulary) rather than as unknown tokens (the tiny test vocabularies)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    probe = tokenizer(" ".join(_letters(rng) for _ in range(20)))["input_ids"]
    return unk is None or unk not in probe


def inclusion_bits(count: int) -> np.ndarray:
    """One fair coin per canary from the operating system's secure source (``os.urandom``)."""
    coins = random.SystemRandom()
    return np.array([coins.random() < 0.5 for _ in range(count)], dtype=bool)


def write_included(path: Path, site: str, canaries: pd.DataFrame, included: np.ndarray) -> Path:
    """The site's file of included canaries, readable by this user only."""
    cols = [c for c in canaries.columns if c != ROW]
    spec = CanaryRows(site=site, columns=cols, rows=canaries.loc[included, cols].values.tolist())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(spec.model_dump_json())
    return Path(path)


def join_canaries(rows: pd.DataFrame, columns: Sequence[str], site_id: str, simulated: bool) -> pd.DataFrame:
    """The site's training rows plus the audit's included canaries, where this is the audited
    simulated site; otherwise ``rows`` unchanged."""
    path = os.environ.get(CANARY_ENV)
    if not path or not simulated:
        return rows
    spec = CanaryRows.model_validate_json(Path(path).read_text(encoding="utf-8"))
    if spec.site != site_id:
        return rows
    if spec.columns != list(columns):
        raise ValueError(f"{path}: canaries have columns {spec.columns}, the run's rows {list(columns)}")
    extra = pd.DataFrame(spec.rows, columns=spec.columns, dtype=str)
    extra[ROW] = np.arange(FIRST_ROW, FIRST_ROW + len(extra))
    log.info("%s: %d audit canaries join its %d training rows", site_id, len(extra), len(rows))
    return pd.concat([rows, extra[[c for c in rows.columns if c in extra.columns]]], ignore_index=True)
