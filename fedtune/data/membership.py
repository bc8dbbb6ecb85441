"""Which rows a site holds out for its local test split, and which rows of a privacy unit it
keeps: decided row by row from a keyed hash (HMAC-SHA256 with a key only the site holds) of the
row's own content, never from its position in the file or from a seed the coordinator sends.

A site's epsilon is a statement about its file under add/remove-one-row adjacency (one unit with
``privacy-unit``): whatever the rest of the file, one row changes what is trained on by at most
that row. A split drawn as a permutation of positions breaks it: removing one row from 1,000
moved about 150 others between the split's sides. Here a row's membership depends on its
content and the site's key alone, so adding or removing a row (a unit) changes no other row's
(unit's) membership; and the coordinator can neither predict nor move the split.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

import numpy as np
import pandas as pd

SEPARATOR = "\x1f"  # between a row's values: no column's text can shift into another's


def derive_key(site_key: bytes, purpose: str) -> bytes:
    """A key for one purpose, separated from every other use of the site's secret."""
    return hmac.new(site_key, f"fedtune/membership/{purpose}/v1".encode(), hashlib.sha256).digest()


def row_contents(df: pd.DataFrame, columns: list[str]) -> list[str]:
    return [SEPARATOR.join(map(str, values)) for values in df[columns].itertuples(index=False, name=None)]


def keyed_uniform(key: bytes, items: Iterable[str]) -> np.ndarray:
    """A number in [0, 1) per item, fixed by the key and the item alone."""
    return np.array([int.from_bytes(hmac.new(key, item.encode(), hashlib.sha256).digest()[:8], "big") / 2.0**64
                     for item in items], dtype=np.float64)


def in_test_split(df: pd.DataFrame, columns: list[str], fraction: float, key: bytes) -> np.ndarray:
    """True for the rows of the site's local test split: each row independently with probability
    ``fraction``, by its content's keyed hash."""
    if fraction <= 0 or df.empty:
        return np.zeros(len(df), dtype=bool)
    return keyed_uniform(derive_key(key, "test-split"), row_contents(df, columns)) < fraction


def split_rows(df: pd.DataFrame, columns: list[str], fraction: float, key: bytes,
               source: str = "data") -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(training rows, test rows or None) of a site's cleaned rows, in file order."""
    if fraction <= 0 or len(df) < 2:
        return df, None
    test = in_test_split(df, columns, fraction, key)
    if test.all():
        from fedtune.data.errors import DataError

        raise DataError(f"{source}: all {len(df)} rows fell in the local test split (test-fraction "
                        f"{fraction:g}); lower the site's test-fraction")
    return df[~test], df[test]
