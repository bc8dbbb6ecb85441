"""The unit of privacy: one row, or one person (patient, customer) with several rows.

DP-SGD with Opacus protects one *row*. When a site's file holds several rows per person, a
person's influence is the sum of their rows'. A site that names an identifier column
(``privacy-unit``) gets each unit's contribution bounded before training: at most
``max-rows-per-unit`` (k) rows per unit, a random subset drawn from a stream only the site knows
(:func:`unit_seed`), the same subset every run. The accountant still counts rows, so the site's
reports add the group-privacy epsilon for k rows (``fedtune.privacy.group``).

Without an identifier column fedtune cannot know who a row belongs to; it reports exact and
near-duplicate rows (same text after lowercasing and whitespace normalisation), a hint that
rows are not independent people.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
from pydantic import BaseModel

from fedtune.data.errors import DataError

_SPACE = re.compile(r"\s+")


class UnitReport(BaseModel):
    column: str
    max_rows_per_unit: int
    rows_read: int
    rows_kept: int
    units: int
    largest_unit: int          # rows of the largest unit before bounding
    units_bounded: int         # units that had more than k rows

    def summary(self) -> str:
        return (f"privacy unit '{self.column}': {self.units} units in {self.rows_read} rows (largest "
                f"{self.largest_unit} rows); {self.units_bounded} units cut to {self.max_rows_per_unit} "
                f"row(s), {self.rows_kept} rows kept")


class DuplicateReport(BaseModel):
    rows: int
    exact: int                 # rows equal to an earlier row in every given column
    near: int                  # further rows equal to an earlier one once normalised

    @property
    def any(self) -> bool:
        return bool(self.exact or self.near)

    def summary(self) -> str:
        return (f"{self.exact} exact and {self.near} near-duplicate rows (same text after lowercasing and "
                f"whitespace normalisation) among {self.rows}: rows may not be independent people; name an "
                "identifier column (privacy-unit) to protect a person rather than a row")


def unit_seed(site_key: bytes, column: str) -> int:
    """A seed for choosing each unit's rows, derived from the site's secret key and separated
    from every other use of that key (the coordinator cannot predict which rows are kept)."""
    digest = hashlib.sha256(b"fedtune/privacy-unit/v1\x00" + site_key + b"\x00" + column.encode()).digest()
    return int.from_bytes(digest[:16], "little")


def bound_units(df: pd.DataFrame, column: str, max_rows: int, seed: int,
                source: str = "data") -> tuple[pd.DataFrame, UnitReport]:
    """Keep at most ``max_rows`` rows of each unit (a uniformly random subset), rows in their
    original order."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if column not in df.columns:
        have = ", ".join(str(c) for c in df.columns if not str(c).startswith("_"))
        raise DataError(f"{source}: no privacy-unit column '{column}'; columns are: {have}")
    ids = df[column]
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    if missing.any():
        raise DataError(f"{source}: {int(missing.sum())} row(s) have no value in the privacy-unit column "
                        f"'{column}'; every row must name its unit")
    keys = np.random.Generator(np.random.PCG64(seed)).random(len(df))
    order = pd.Series(keys, index=df.index).groupby(ids.astype(str).to_numpy()).rank(method="first")
    sizes = ids.astype(str).value_counts()
    kept = df[(order <= max_rows).to_numpy()]
    report = UnitReport(
        column=column, max_rows_per_unit=max_rows, rows_read=len(df), rows_kept=len(kept),
        units=int(len(sizes)), largest_unit=int(sizes.max()) if len(sizes) else 0,
        units_bounded=int((sizes > max_rows).sum()),
    )
    return kept, report


def normalise_text(value: str) -> str:
    return _SPACE.sub(" ", str(value)).strip().casefold()


def duplicate_report(df: pd.DataFrame, columns: list[str]) -> DuplicateReport:
    """Exact duplicates over ``columns``, and rows that repeat an earlier row once every value
    is lowercased and its whitespace normalised (near duplicates, beyond the exact ones)."""
    if df.empty:
        return DuplicateReport(rows=0, exact=0, near=0)
    exact = int(df.duplicated(subset=columns).sum())
    normalised = pd.DataFrame({c: df[c].map(normalise_text) for c in columns})
    near = int(normalised.duplicated().sum()) - exact
    return DuplicateReport(rows=len(df), exact=exact, near=max(0, near))
