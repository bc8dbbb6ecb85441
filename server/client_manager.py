"""Flower's client manager, restricted to the sites that may take part (server/health.py and
the pre-flight) and with a bounded wait: a round waits at most ``join_timeout`` for enough
eligible sites, never Flower's default of a day."""

from __future__ import annotations

import random
from typing import Callable, Optional

from flwr.server.client_manager import SimpleClientManager


class EligibleClientManager(SimpleClientManager):
    def __init__(self, eligible: Callable[[int], bool], join_timeout: float,
                 on_leave: Optional[Callable[[int], None]] = None):
        super().__init__()
        self._eligible = eligible
        self.join_timeout = join_timeout
        self._on_leave = on_leave

    def unregister(self, client) -> None:
        """Flower's node poller calls this when a site's SuperNode goes offline (no heartbeat)."""
        super().unregister(client)
        if self._on_leave is not None:
            self._on_leave(client.node_id)

    def _eligible_cids(self) -> list[str]:
        return [cid for cid, proxy in self.clients.items() if self._eligible(proxy.node_id)]

    def num_available(self) -> int:
        return len(self._eligible_cids())

    def wait_for(self, num_clients: int, timeout: Optional[float] = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: len(self._eligible_cids()) >= num_clients,
                                     timeout=min(timeout or self.join_timeout, self.join_timeout))

    def notify(self) -> None:
        """Eligibility changed (a pre-flight answer, an exclusion): wake any waiting round."""
        with self._cv:
            self._cv.notify_all()

    def sample(self, num_clients: int, min_num_clients: Optional[int] = None, criterion=None) -> list:
        min_num_clients = num_clients if min_num_clients is None else min_num_clients
        self.wait_for(min_num_clients)
        cids = [c for c in self._eligible_cids() if criterion is None or criterion.select(self.clients[c])]
        if len(cids) < min_num_clients:
            return []
        return [self.clients[c] for c in random.sample(cids, min(num_clients, len(cids)))]
