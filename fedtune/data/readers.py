"""Read a site's table (CSV, TSV, JSON Lines, Parquet) into a DataFrame of strings.

Everything is read as text: labels such as "01" or "1.0" must not be silently turned into
numbers, and an empty cell must stay "" (not NaN) so cleaning can drop it explicitly.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from fedtune.data.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "parquet")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# Long documents (causal LM) can exceed the csv module's 128 KiB default field limit.
csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))


def read_table(path: Path, fmt: str = "auto") -> pd.DataFrame:
    path = Path(path)
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if fmt == "parquet":
        return _read_parquet(path)
    text = _read_utf8(path)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    return _read_delimited(path, text, fmt)


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt in FORMATS:
        return fmt
    if fmt != "auto":
        raise DataError(f"{path}: unknown format '{fmt}'; supported: auto, {', '.join(FORMATS)}")
    found = EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        exts = ", ".join(EXTENSIONS)
        raise DataError(
            f"{path}: cannot tell the format from the extension '{Path(path).suffix}'; "
            f"supported extensions: {exts} (or set data.format)"
        )
    return found


def _read_utf8(path: Path) -> str:
    # Decoding ourselves (instead of letting the parser fail) lets us point at the exact line.
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # Excel writes a byte-order mark


def _read_delimited(path: Path, text: str, fmt: str) -> pd.DataFrame:
    # The csv module (not pandas) so rows with too few fields are errors too, with a line number.
    if fmt == "tsv":  # TSV files in the wild are unquoted: a quote or backslash is literal text
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((r for r in reader if r), None)
        if header is None:
            raise DataError(f"{path}: the file is empty (expected a header row)")
        _check_header(path, header)
        rows = []
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path}: line {reader.line_num}: expected {len(header)} fields "
                    f"({', '.join(header)}), found {len(row)}"
                )
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: cannot parse {fmt.upper()}: {exc}") from None
    return _frame(header, rows)


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    if text.lstrip().startswith("["):  # a plain .json array of objects: accept it too
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
        numbered: Iterable[tuple[int, Any]] = ((i, r) for i, r in enumerate(records, 1))
        where = "record"
    else:
        numbered = _json_lines(path, text)
        where = "line"
    columns: dict[str, None] = {}
    records = []
    for n, obj in numbered:
        if not isinstance(obj, dict):
            raise DataError(f"{path}: {where} {n}: expected a JSON object, found {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
        records.append(obj)
    if not records:
        raise DataError(f"{path}: the file has no records")
    rows = [[_to_str(r.get(c)) for c in columns] for r in records]
    return _frame(list(columns), rows)


def _json_lines(path: Path, text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    header = [str(n) for n in table.column_names]
    _check_header(path, header)
    cols = [[_to_str(v) for v in table.column(i).to_pylist()] for i in range(table.num_columns)]
    return pd.DataFrame(dict(zip(header, cols)), columns=header, dtype=str)


def _to_str(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None / NaN -> empty
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _check_header(path: Path, header: list[str]) -> None:
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: column '{name}' appears twice in the header")
        seen.add(name)


def _frame(header: list[str], rows: list[list[str]]) -> pd.DataFrame:
    return pd.DataFrame({h: [r[i] for r in rows] for i, h in enumerate(header)}, columns=header, dtype=str)
