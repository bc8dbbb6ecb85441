"""What this site received and sent, message by message, for the site agent's console
(``fedtune client`` prints one line per round from it). Written only where the site has its own
state folder (a deployed site agent); a simulation's sites keep nothing here.

Each line of ``<state-dir>/traffic.jsonl``: run id, round (Flower's group id), message type,
bytes in, bytes out (the serialised reply: what left the site), or the error that kept a reply
from being sent (a refused round)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import Context, Message

TRAFFIC_FILE = "traffic.jsonl"

log = logging.getLogger("fedtune.client.site")


def _bytes(msg: Message) -> int:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


def traffic_mod(msg: Message, context: Context, call_next) -> Message:
    state = context.node_config.get("state-dir")
    if not state:
        return call_next(msg, context)
    entry = {"run_id": msg.metadata.run_id, "round": msg.metadata.group_id, "type": msg.metadata.message_type,
             "bytes_in": _bytes(msg), "time": time.time()}
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        entry.update(bytes_out=0, error=f"{type(exc).__name__}: {exc}")
        _append(Path(str(state)), entry)
        raise
    entry["bytes_out"] = _bytes(reply) if not reply.has_error() else 0
    if reply.has_error():
        entry["error"] = reply.error.reason
    _append(Path(str(state)), entry)
    return reply


def _append(folder: Path, entry: dict) -> None:
    """One line for the site's console; a line that cannot be written (a full disk, a broken
    state folder) is only logged here: it must never turn into the reply, whose error text
    Flower would forward to the coordinator with the site's path in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / TRAFFIC_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
    except OSError as err:
        log.warning("cannot record the site's traffic in %s: %s", folder, err)
