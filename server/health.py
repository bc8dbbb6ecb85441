"""Which sites take part in a round: the exclusion policy.

A site is left out for the rest of the run only when it refuses (its privacy budget or policy), fails
its pre-flight, or fails ``max_consecutive_failures`` rounds in a row; one failure (a dropped
connection, a restart) only costs it that round. A site left out for failures or its pre-flight
that disconnects and connects again (its agent restarted, repaired) is taken back, and left out
again at its next failure unless it succeeds first; a refusal stays final."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.federation.refusal import refusal_kind


@dataclass
class SiteHealth:
    max_consecutive_failures: int = 2
    failures: dict[int, int] = field(default_factory=dict)     # node -> failed rounds in a row
    excluded: dict[int, str] = field(default_factory=dict)     # node -> why, for the rest of the run
    refused: set[int] = field(default_factory=set)             # the site's own decision: final

    def eligible(self, node: int) -> bool:
        return node not in self.excluded

    def exclude(self, node: int, reason: str) -> None:
        self.excluded.setdefault(node, reason)

    def succeeded(self, node: int) -> None:
        self.failures.pop(node, None)

    def failed(self, node: int, error: str = "") -> str:
        """Record one failed round; returns 'refused', 'excluded' or 'failed'."""
        kind = refusal_kind(error)
        if kind is not None:  # the site's own decision: asking again gets the same answer
            self.exclude(node, kind)
            self.refused.add(node)
            return "refused"
        self.failures[node] = self.failures.get(node, 0) + 1
        if self.failures[node] >= self.max_consecutive_failures:
            self.exclude(node, f"failed {self.failures[node]} rounds in a row")
            return "excluded"
        return "failed"

    def reconnected(self, node: int) -> bool:
        """The site's agent disconnected (and may come back): an exclusion for failures or a
        failed pre-flight is lifted; its count of failures in a row is kept. Returns whether it
        had been left out."""
        if node in self.refused:
            return False
        return self.excluded.pop(node, None) is not None
