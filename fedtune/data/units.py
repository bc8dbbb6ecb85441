"""The unit of privacy: one row, or one person (patient, customer) with several rows.

DP-SGD with Opacus protects one *row*. When a site's file holds several rows per person, a
person's influence is the sum of their rows'. A site that names an identifier column
(``privacy-unit``) gets each unit's contribution bounded before training: at most
``max-rows-per-unit`` (k) rows per unit, a random subset drawn from a stream only the site knows
(a keyed hash, fedtune/data/membership.py), the same subset every run. The accountant still counts rows, so the site's
reports add the group-privacy epsilon for k rows (``fedtune.privacy.group``).

Without an identifier column fedtune cannot know who a row belongs to; it reports exact and
near-duplicate rows (same text after lowercasing and whitespace normalisation), a hint that
rows are not independent people.
"""

from __future__ import annotations

import re

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


def bound_units(df: pd.DataFrame, column: str, max_rows: int, key: bytes, columns: list[str],
                source: str = "data") -> tuple[pd.DataFrame, UnitReport]:
    """Keep at most ``max_rows`` rows of each unit, rows in their original order. Which rows: the
    ``max_rows`` with the smallest keyed hash (the site's secret ``key``) of the unit id and the
    row's ``columns``: a uniformly random subset the coordinator cannot predict, the same every
    run, and one that adding or removing a unit (or a row of one unit) leaves unchanged for
    every other unit (fedtune/data/membership.py)."""
    from fedtune.data.membership import SEPARATOR, derive_key, keyed_uniform, row_contents

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
    units = ids.astype(str)
    content = [u + SEPARATOR + c for u, c in zip(units, row_contents(df, [c for c in columns if c != column]))]
    keys = keyed_uniform(derive_key(key, f"privacy-unit/{column}"), content)
    order = pd.Series(keys, index=df.index).groupby(units.to_numpy()).rank(method="first")
    sizes = units.value_counts()
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
