"""The site's own record of its DP training for a run: every call's (noise, sample rate, steps).

Kept in the site's state folder, written atomically, so a new process (Flower starts one per
message in deployment) or a resumed run composes epsilon over everything already spent.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.io_utils import atomic_write_json
from fedtune.privacy.accounting import AccountantHistory


class RunLedger:
    def __init__(self, state_dir: Path, run_id: str, mechanism: str):
        self.path = Path(state_dir) / "runs" / f"{run_id}.json"
        self.mechanism = mechanism

    def load(self) -> AccountantHistory:
        if not self.path.is_file():
            return AccountantHistory(mechanism=self.mechanism)
        data = json.loads(self.path.read_text())
        return AccountantHistory(mechanism=data["mechanism"], history=[tuple(h) for h in data["history"]])

    def save(self, history: AccountantHistory, rounds: list[int]) -> None:
        atomic_write_json(self.path, {"mechanism": history.mechanism, "history": history.history, "rounds": rounds})

    def rounds(self) -> list[int]:
        if not self.path.is_file():
            return []
        return list(json.loads(self.path.read_text()).get("rounds", []))
