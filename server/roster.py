"""The sites of a run: who is connected, who passed the pre-flight, who is left out and why,
and the SecAgg+ settings that follow from the sites actually there."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from .health import SiteHealth
from .preflight import ask_sites

log = logging.getLogger("fedtune.server")


class TooFewSites(Exception):
    """Fewer eligible sites than a round needs, after waiting join_timeout."""


@dataclass
class SiteRoster:
    min_sites: int
    planned_sites: int
    join_timeout: float
    stage_timeout: float
    preflight: bool                         # deployed sites are asked; simulated ones hold the run's own split
    health: SiteHealth
    fixed_max_weight: float = 0.0           # federation.secagg_max_weight (0: from the sites' buckets)
    needed_for: str = ""                    # why min_sites, for the message ("for SecAgg+")
    node_site: dict = field(default_factory=dict)
    ready: dict = field(default_factory=dict)        # node -> declared bucket of training rows
    client_manager: Optional[object] = None
    max_weight: float = 0.0
    _first: bool = True
    # Sites whose SuperNode went offline since the last round (Flower's poller thread adds them).
    _left: set = field(default_factory=set)

    def site(self, node: int) -> str:
        return self.node_site.get(node, f"node {node}")

    def eligible(self, node: int) -> bool:
        return self.health.eligible(node) and (not self.preflight or node in self.ready)

    def left(self, node: int) -> None:
        """A site disconnected (called from Flower's poller thread; handled before the next round)."""
        self._left.add(node)

    def _forget_the_departed(self) -> None:
        """A site that left is asked the pre-flight again when it comes back (its data or version
        may have changed); an exclusion other than a refusal is lifted (server/health.py)."""
        while self._left:
            node = self._left.pop()
            self.ready.pop(node, None)
            if self.health.reconnected(node):
                log.info("%s disconnected; it is taken back if it reconnects and passes the pre-flight",
                         self.site(node))

    def connected(self) -> list[int]:
        cm = self.client_manager
        return sorted(p.node_id for p in cm.all().values()) if cm is not None else []

    def _wait(self, count: int) -> None:
        deadline = time.monotonic() + self.join_timeout
        while time.monotonic() < deadline:
            if len([n for n in self.connected() if self.health.eligible(n)]) >= count:
                return
            time.sleep(0.5)

    def admit(self, grid, run_id: str, config_toml: str) -> None:
        """Before a round: wait for sites (all planned ones before the first round, at most
        join_timeout), ask newly connected sites the pre-flight, and stop the run when fewer
        than min_sites can take part."""
        if self.preflight:
            self._forget_the_departed()
        if self._first:
            self._wait(self.planned_sites)
        elif self.preflight:  # a deployed site that died may come back, or another join
            self._wait(self.min_sites)
        new = [n for n in self.connected() if n not in self.ready and self.health.eligible(n)]
        if self.preflight and new:
            for node, answer in ask_sites(grid, new, run_id, config_toml, self.stage_timeout).items():
                if isinstance(answer, str):  # no reply, or an error reply instead of a pre-flight answer
                    what = "failed its pre-flight" if answer.startswith("error:") else "did not answer the pre-flight"
                    log.warning("pre-flight: %s %s (%s); asked again next round", self.site(node), what, answer)
                    continue
                self.node_site[node] = answer.site
                if answer.ready:
                    self.ready[node] = answer.bucket
                    log.info("pre-flight: %s ready (fedtune %s)", answer.site, answer.version)
                else:
                    self.health.exclude(node, f"pre-flight: {answer.reason}")
                    log.error("pre-flight: %s is not ready: %s", answer.site, answer.reason)
            if self.client_manager is not None:
                self.client_manager.notify()
        self._update_max_weight()
        eligible = [n for n in self.connected() if self.eligible(n)]
        first, self._first = self._first, False
        if len(eligible) < self.min_sites:
            left_out = "; ".join(f"{self.site(n)}: {why}" for n, why in sorted(self.health.excluded.items()))
            when = "before round 1" if first else "for this round"
            raise TooFewSites(f"{len(eligible)} site(s) can take part {when}, {self.min_sites} needed{self.needed_for}"
                              + (f" (left out: {left_out})" if left_out else ""))

    def _update_max_weight(self) -> None:
        if not self.preflight:
            return
        declared = max((b for n, b in self.ready.items() if self.health.eligible(n)), default=0)
        if self.fixed_max_weight:
            if declared > self.fixed_max_weight:
                log.warning("a site declares up to %d training rows, above federation.secagg_max_weight = %g: "
                            "it refuses if its rows exceed it", declared, self.fixed_max_weight)
            self.max_weight = self.fixed_max_weight
        elif declared > self.max_weight:  # never lowered within a run
            self.max_weight = float(declared)
            log.info("SecAgg+ max_weight %d (the largest bucket the sites declared)", declared)
