"""Round checkpoints: the global adapter and the run state, written atomically.

A checkpoint folder is written under a temporary name and renamed into place, then
``latest.json`` is replaced atomically: a crash at any point leaves the previous checkpoint
intact and pointed to.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from fedtune.io_utils import atomic_replace_dir, atomic_write_json

KEEP = 2  # older round folders are deleted once a newer one is in place


def save_checkpoint(folder: Path, rnd: int, arrays: "OrderedDict[str, np.ndarray]", state: dict,
                    optimizer: Optional[dict[str, list[np.ndarray]]] = None) -> Path:
    """``optimizer``: the server optimiser's state (FedAdam's moments), restored on resume."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".round-", dir=folder))
    final = folder / f"round-{rnd:04d}"
    try:
        with open(tmp / "adapter.npz", "wb") as fh:
            np.savez(fh, **{f"{i:04d}": a for i, a in enumerate(arrays.values())})
        if optimizer:
            with open(tmp / "optimizer.npz", "wb") as fh:
                np.savez(fh, **{f"{key}-{i:04d}": a for key, values in optimizer.items() for i, a in enumerate(values)})
        atomic_write_json(tmp / "names.json", list(arrays.keys()))
        atomic_write_json(tmp / "state.json", {**state, "round": rnd})
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(folder / "latest.json", {"round": rnd, "path": final.name})
    for old in sorted(folder.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(folder: Path) -> Optional[tuple[int, "OrderedDict[str, np.ndarray]", dict]]:
    pointer = Path(folder) / "latest.json"
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text())
    path = Path(folder) / latest["path"]
    names = json.loads((path / "names.json").read_text())
    with np.load(path / "adapter.npz") as npz:
        arrays = OrderedDict((n, npz[f"{i:04d}"]) for i, n in enumerate(names))
    state = json.loads((path / "state.json").read_text())
    return int(latest["round"]), arrays, state


def load_optimizer(folder: Path) -> dict[str, list[np.ndarray]]:
    """The server optimiser's state saved with the latest checkpoint ({} if none)."""
    pointer = Path(folder) / "latest.json"
    if not pointer.is_file():
        return {}
    path = Path(folder) / json.loads(pointer.read_text())["path"] / "optimizer.npz"
    if not path.is_file():
        return {}
    out: dict[str, list[np.ndarray]] = {}
    with np.load(path) as npz:
        for name in sorted(npz.files):
            key, _ = name.rsplit("-", 1)
            out.setdefault(key, []).append(npz[name])
    return out
