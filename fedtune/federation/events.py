"""Each round's metrics as TensorBoard event files under ``<run>/tensorboard/``, so that
``tensorboard --logdir runs/`` shows a run live: central and federated metrics, each site's
epsilon and training loss, bytes per site, seconds per round.

Written with tensorboardX (small: numpy and protobuf); the viewer itself is the optional extra
``pip install "fedtune[tensorboard]"``. Where tensorboardX is missing the run goes on and says so
once in its log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

_writers: dict[Path, object] = {}
_missing_noted = False


def _writer(out_dir: Path):
    """tensorboardX's synchronous event-file writer (its SummaryWriter queues events to a thread
    and writes them seconds later; a round's values should be on disk when the round ends)."""
    global _missing_noted
    folder = (Path(out_dir) / "tensorboard").resolve()
    if folder not in _writers:
        try:
            from tensorboardX.event_file_writer import EventsWriter
        except ImportError:
            if not _missing_noted:
                log.info("tensorboardX is not installed: no TensorBoard event files for this run")
                _missing_noted = True
            return None
        folder.mkdir(parents=True, exist_ok=True)
        _writers[folder] = EventsWriter(str(folder / "events"))
    return _writers[folder]


def round_scalars(record: dict) -> dict[str, float]:
    """The record of one round as TensorBoard tags -> values."""
    out: dict[str, float] = {}
    for group in ("central", "federated"):
        for key, value in (record.get(group) or {}).items():
            if isinstance(value, (int, float)):
                out[f"{group}/{key}"] = float(value)
    for site, values in (record.get("sites") or {}).items():
        for key in ("epsilon", "train_loss"):
            if isinstance((values or {}).get(key), (int, float)):
                out[f"{key}/{site}"] = float(values[key])
    for direction in ("bytes_up", "bytes_down"):
        counts = record.get(direction) or {}
        for site, n in counts.items():
            out[f"MB_{direction.split('_')[1]}/{site}"] = n / 1e6
        if counts:
            out[f"MB_{direction.split('_')[1]}/all_sites"] = sum(counts.values()) / 1e6
    if record.get("round"):
        out["seconds/round"] = float(record.get("seconds") or 0.0)
    return out


def write_round_events(out_dir: Path, record: dict) -> None:
    """One event per round holding all its scalars, flushed to disk before this returns."""
    writer = _writer(out_dir)
    if writer is None:
        return
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in round_scalars(record).items()]
    writer.write_event(Event(wall_time=time.time(), step=int(record.get("round", 0)), summary=Summary(value=values)))
    writer.flush()


def close_events(out_dir: Path) -> None:
    writer = _writers.pop((Path(out_dir) / "tensorboard").resolve(), None)
    if writer is not None:
        writer.close()
