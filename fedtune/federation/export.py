"""Write a simulated federation's split as files: one per site plus the coordinator's
evaluation file, to try a real deployment (``fedtune client --data site-0.csv``) on the
same data as the simulation."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import FedTuneConfig
from fedtune.io_utils import atomic_write_text

from .dataset import federated_rows, site_id


LABELS_FILE = "labels.txt"


def write_site_files(cfg: FedTuneConfig, out: Path) -> list[Path]:
    """The site files, the coordinator's evaluation file and, for classification, ``labels.txt``:
    the label set each site declares (``fedtune client --labels "$(cat labels.txt)"``), since a
    deployed site answers only runs naming the labels its admin declared."""
    rows = federated_rows(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in [*((site_id(i), s) for i, s in enumerate(rows.sites)), ("eval", rows.central)]:
        path = out / f"{name}.csv"
        atomic_write_text(path, frame[rows.columns].to_csv(index=False))
        written.append(path)
    if rows.label_map is not None:
        atomic_write_text(out / LABELS_FILE, ",".join(rows.label_map.labels) + "\n")
        written.append(out / LABELS_FILE)
    return written
