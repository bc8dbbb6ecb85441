"""``python -m fedtune.deployment.supernode_pace ARGS``: Flower's own ``flower-supernode ARGS``
with shorter fixed waits.

Flower 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``) hard-codes two waits:

- ``time.sleep(3)`` between pulls when the SuperLink had no message for it. In a SecAgg+ round a
  site gets five messages back to back (setup, key sharing, training, unmasking, evaluation), so
  each of them waited up to 3 s before any work;
- ``time.sleep(0.5)`` steps while it waits for the ClientApp's reply (and its contents);
- a first retry after 1 s when a new message's objects are not all at the SuperLink yet
  (``pull_objects``; flower.py's ``fast_object_pulls``).

This launcher replaces the module's ``time`` with one whose ``sleep`` shortens exactly those two
literals, and nothing else of Flower: after a message arrived the SuperNode pulls every
``ACTIVE_PULL_SECONDS`` for ``ACTIVE_WINDOW_SECONDS``, then falls back to Flower's 3 s; reply
waits poll every ``REPLY_POLL_SECONDS`` (its own in-memory state, no network). Request rate on
the SuperLink: a site in an active run pulls 1 / 0.25 s = 4 times a second, so 50 sites add
about 200 small pull requests a second while a run is active and about 17 a second (50 / 3 s, as
with Flower alone) when none is. :func:`check_pinned` refuses to start when the lines it relies
on are not those of the pinned Flower (tests/test_site_worker.py checks it too).

It also takes ``--heartbeat-interval SECONDS`` (``fedtune client --heartbeat-interval``), which
Flower 1.42's SuperNode hard-codes at 30 s (``HEARTBEAT_DEFAULT_INTERVAL``): the SuperLink
marks a site offline, and fails the messages it still owes, 2 intervals after its last
heartbeat, so a site that dies mid-round holds that round up to 60 s by default; at 10 s (Flower's
minimum), up to 20 s, for one small heartbeat request every 4 s instead of every 12 s.
"""

from __future__ import annotations

import inspect
import sys
import time as _time
from typing import Optional

IDLE_PULL_SECONDS = 3        # Flower 1.42's literal: no message at the SuperLink
REPLY_WAIT_SECONDS = 0.5     # Flower 1.42's literal: waiting for the ClientApp's reply
ACTIVE_PULL_SECONDS = 0.25
ACTIVE_WINDOW_SECONDS = 120.0
REPLY_POLL_SECONDS = 0.02

MIN_HEARTBEAT_SECONDS, MAX_HEARTBEAT_SECONDS = 10.0, 1800.0  # Flower 1.42's HEARTBEAT_MIN/MAX_INTERVAL

# The node heartbeat's interval as Flower 1.42 reads it: the interval the SuperNode reports
# (fleet_http_connection) and the one its heartbeat thread waits by (supercore/heartbeat.py).
PINNED_HEARTBEAT_LINES = {
    "flwr.supernode.fleet_http_connection": ("node=node, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL",
                                             "heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL,"),
    "flwr.supercore.heartbeat": ("next_interval: float = HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT",),
}

PINNED_LINES = (
    "import time\n",
    "            run_id = _pull_and_store_message(\n",
    "                time.sleep(3)\n",
    "        time.sleep(0.5)\n",
    "                    time.sleep(0.5)\n",
    "            obj_contents = pull_objects(\n",
)


class PacedTime:
    """The ``time`` module, but with Flower's two fixed waits shortened (see the module text)."""

    def __init__(self, clock=_time):
        self._clock = clock
        self.last_message = -float("inf")

    def __getattr__(self, name):
        return getattr(self._clock, name)

    def message_arrived(self) -> None:
        self.last_message = self._clock.monotonic()

    def pace(self, seconds: float) -> float:
        if seconds == IDLE_PULL_SECONDS:
            active = self._clock.monotonic() - self.last_message < ACTIVE_WINDOW_SECONDS
            return ACTIVE_PULL_SECONDS if active else seconds
        if seconds == REPLY_WAIT_SECONDS:
            return REPLY_POLL_SECONDS
        return seconds

    def sleep(self, seconds: float) -> None:
        self._clock.sleep(self.pace(seconds))


def check_pinned(module) -> None:
    """Raise when the SuperNode loop is not the one this launcher was written against."""
    source = inspect.getsource(module)
    missing = [line.strip() for line in PINNED_LINES if line not in source]
    if missing:
        raise RuntimeError(f"{module.__name__} is not the Flower 1.42.0 SuperNode loop fedtune paces "
                           f"(missing: {missing}); reinstall the pinned flwr")


def check_heartbeat_pinned() -> None:
    """Raise when Flower no longer reads the node heartbeat's interval where set_heartbeat sets it."""
    import importlib

    for name, lines in PINNED_HEARTBEAT_LINES.items():
        source = inspect.getsource(importlib.import_module(name))
        missing = [line for line in lines if line not in source]
        if missing:
            raise RuntimeError(f"{name} is not the Flower 1.42.0 heartbeat fedtune sets (missing: {missing}); "
                               "reinstall the pinned flwr")


def check_heartbeat(seconds: float) -> float:
    """``seconds`` if Flower's SuperLink accepts it as a heartbeat interval, else ValueError."""
    if not MIN_HEARTBEAT_SECONDS <= seconds <= MAX_HEARTBEAT_SECONDS:
        raise ValueError(f"--heartbeat-interval {seconds:g}: must be between {MIN_HEARTBEAT_SECONDS:g} and "
                         f"{MAX_HEARTBEAT_SECONDS:g} seconds (what Flower's SuperLink accepts)")
    return seconds


def set_heartbeat(seconds: float) -> None:
    """This SuperNode's node heartbeat: reported to the SuperLink, and the pace of its sender."""
    import importlib

    check_heartbeat(seconds)
    check_heartbeat_pinned()
    for name in PINNED_HEARTBEAT_LINES:
        importlib.import_module(name).HEARTBEAT_DEFAULT_INTERVAL = seconds


def install(heartbeat_seconds: Optional[float] = None) -> PacedTime:
    """Pace the SuperNode loop of this process (before it starts)."""
    from flwr.supernode import start_client_internal as loop

    check_pinned(loop)
    if heartbeat_seconds is not None:
        set_heartbeat(heartbeat_seconds)
    paced = PacedTime()
    pull = loop._pull_and_store_message

    def pull_and_note(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            paced.message_arrived()
        return run_id

    loop._pull_and_store_message = pull_and_note
    loop.time = paced
    from .flower import fast_object_pulls

    fast_object_pulls(loop)
    return paced


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--heartbeat-interval", type=float, default=None)
    opts, flower_args = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    install(opts.heartbeat_interval)
    from flwr.supercore.logger import update_console_handler

    # Its log goes to a file in the site's state folder: with the time of every line, no colours.
    update_console_handler(timestamps=True, colored=False)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
