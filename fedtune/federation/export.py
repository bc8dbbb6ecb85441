"""Write a simulated federation's split as files: one per site plus the coordinator's
evaluation file, to try a real deployment (``fedtune client --data site-0.csv``) on the
same data as the simulation."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import FedTuneConfig
from fedtune.io_utils import atomic_write_text

from .dataset import federated_rows, site_id


def write_site_files(cfg: FedTuneConfig, out: Path) -> list[Path]:
    rows = federated_rows(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in [*((site_id(i), s) for i, s in enumerate(rows.sites)), ("eval", rows.central)]:
        path = out / f"{name}.csv"
        atomic_write_text(path, frame[rows.columns].to_csv(index=False))
        written.append(path)
    return written
