"""Label name <-> id mapping, fixed once (from the training rows) and shared across sites."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedtune.data.errors import DataError
from fedtune.io_utils import atomic_write_json

_INT = re.compile(r"[+-]?\d+")


def _order(values: Iterable[str]) -> list[str]:
    # Integer labels sort as numbers so "10" comes after "9" and ids match the usual 0..k-1.
    unique = set(values)
    if unique and all(_INT.fullmatch(v) for v in unique):
        return sorted(unique, key=lambda v: (int(v), v))
    return sorted(unique)


class LabelMap:
    def __init__(self, labels: Sequence[str]):
        labels = [str(v) for v in labels]
        if not labels:
            raise ValueError("a label map needs at least one label")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {labels}")
        self.labels: list[str] = labels
        self.label2id: dict[str, int] = {v: i for i, v in enumerate(labels)}
        self.id2label: dict[int, str] = dict(enumerate(labels))

    @classmethod
    def from_values(cls, values: Iterable[Any]) -> "LabelMap":
        return cls(_order(str(v) for v in values))

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def _known(self) -> str:
        shown = ", ".join(self.labels[:20])
        return shown + (f", ... ({self.num_labels} in all)" if self.num_labels > 20 else "")

    def id_of(self, value: str) -> int:
        try:
            return self.label2id[str(value)]
        except KeyError:
            raise KeyError(f"label '{value}' is not in the label map (known: {self._known()})") from None

    def encode(self, values: Iterable[Any], rows: Iterable[int], source: str, column: str) -> list[int]:
        ids = []
        for value, row in zip(values, rows):
            i = self.label2id.get(str(value))
            if i is None:
                raise DataError(
                    f"{source}: row {row}, column '{column}': label '{value}' is not in the "
                    f"label map (known: {self._known()})"
                )
            ids.append(i)
        return ids

    def to_json(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_json(cls, obj: dict | str) -> "LabelMap":
        if isinstance(obj, str):
            obj = json.loads(obj)
        labels = obj.get("labels") if isinstance(obj, dict) else None
        if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
            raise ValueError('a label map is {"labels": [names...]}')
        return cls(labels)

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> "LabelMap":
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: label map file not found") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a valid label map: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and other.labels == self.labels

    def __len__(self) -> int:
        return self.num_labels

    def __repr__(self) -> str:
        return f"LabelMap({self.labels!r})"
