"""Bytes each site receives and sends, measured on the real Flower messages."""

from __future__ import annotations

from collections import defaultdict

from flwr.common.serde import recorddict_to_proto


def message_bytes(msg) -> int:
    if not msg.has_content():
        return 0
    return recorddict_to_proto(msg.content).ByteSize()


class MeteredGrid:
    """Wraps Flower's Grid; counts the serialised size of every message per node."""

    def __init__(self, grid, default_timeout: float | None = None):
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
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for r in replies:
            self.bytes_up[r.metadata.src_node_id] += message_bytes(r)
            if r.has_error():
                self.errors[r.metadata.src_node_id] = str(r.error.reason)
        return replies

    def take(self) -> tuple[dict[int, int], dict[int, int]]:
        """Counts since the last call (one round), then reset."""
        down, up = dict(self.bytes_down), dict(self.bytes_up)
        self.bytes_down.clear()
        self.bytes_up.clear()
        return down, up
