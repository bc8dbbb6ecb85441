"""The coordinator's grid: bytes each site receives and sends, measured on the real Flower
messages, and replies collected as soon as they arrive."""

from __future__ import annotations

import time
from collections import defaultdict

from flwr.common.serde import recorddict_to_proto


def message_bytes(msg) -> int:
    if not msg.has_content():
        return 0
    return recorddict_to_proto(msg.content).ByteSize()


PULL_SECONDS = 0.05  # Flower 1.42's deployed grid waits 3 s between pulls (superlink/grid/http_grid.py)


class MeteredGrid:
    """Wraps Flower's Grid; counts the serialised size of every message per node, and pulls
    replies every ``PULL_SECONDS`` through the Grid's own ``push_messages`` / ``pull_messages``
    (the coordinator's own SuperLink, on its machine)."""

    def __init__(self, grid, default_timeout: float | None = None):
        from flwr.superlink.grid import http_grid

        from fedtune.deployment.flower import fast_object_pulls

        fast_object_pulls(http_grid)  # a reply's objects still arriving: asked again after 0.05 s, not 1 s
        self._grid = grid
        self.bytes_down: dict[int, int] = defaultdict(int)
        self.bytes_up: dict[int, int] = defaultdict(int)
        # A deadline for every exchange (Flower's evaluate workflow sets none), and each node's
        # last error reply (why it failed: a budget refusal is final, other errors are not).
        self.default_timeout = default_timeout
        self.errors: dict[int, str] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        for m in messages:
            self.bytes_down[m.metadata.dst_node_id] += message_bytes(m)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        replies = self._exchange(messages, kwargs["timeout"])
        for r in replies:
            self.bytes_up[r.metadata.src_node_id] += message_bytes(r)
            if r.has_error():
                self.errors[r.metadata.src_node_id] = str(r.error.reason)
        return replies

    def _exchange(self, messages, timeout: float | None) -> list:
        """Flower's ``send_and_receive`` (push, then pull until every reply is in or the timeout
        passed), with a short pull interval."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting:
                time.sleep(PULL_SECONDS)
        return replies

    def take(self) -> tuple[dict[int, int], dict[int, int]]:
        """Counts since the last call (one round), then reset."""
        down, up = dict(self.bytes_down), dict(self.bytes_up)
        self.bytes_down.clear()
        self.bytes_up.clear()
        return down, up
