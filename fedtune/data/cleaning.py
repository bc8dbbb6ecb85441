"""Row cleaning shared by every data source: strip, drop empty and duplicate rows, count it all."""

from __future__ import annotations

import pandas as pd
from pydantic import BaseModel

from fedtune.data.errors import DataError

ROW = "_row"  # original 1-based data row number, kept so later errors can name the row


class CleaningReport(BaseModel):
    rows_read: int
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    # Rows moved to a held-out eval split (no eval file given); not part of rows_kept.
    held_out: int = 0
    rows_kept: int

    def summary(self) -> str:
        text = (
            f"read {self.rows_read} rows, dropped {self.empty_dropped} with an empty value "
            f"and {self.duplicates_dropped} duplicates"
        )
        if self.held_out:
            text += f", held out {self.held_out} for eval"
        return text + f", kept {self.rows_kept}"


def check_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    for col in columns:
        if col not in df.columns:
            have = ", ".join(c for c in df.columns if c != ROW)
            raise DataError(f"{source}: no column '{col}'; columns are: {have}")


def clean_rows(df: pd.DataFrame, columns: list[str], source: str) -> tuple[pd.DataFrame, CleaningReport]:
    """Keep only ``columns`` (plus ``_row``), stripped, with no empty value and no exact duplicate."""
    check_columns(df, columns, source)
    columns = list(dict.fromkeys(columns))
    out = pd.DataFrame({c: df[c].fillna("").astype(str).str.strip() for c in columns})
    out[ROW] = df[ROW].to_numpy() if ROW in df.columns else range(1, len(df) + 1)
    nonempty = out[(out[columns] != "").all(axis=1)]
    kept = nonempty[~nonempty.duplicated(subset=columns)].reset_index(drop=True)
    report = CleaningReport(
        rows_read=len(df),
        empty_dropped=len(out) - len(nonempty),
        duplicates_dropped=len(nonempty) - len(kept),
        rows_kept=len(kept),
    )
    if kept.empty:
        raise DataError(f"{source}: no usable rows left after cleaning ({report.summary()})")
    return kept, report
