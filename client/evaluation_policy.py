"""Whether a site answers a federated-evaluation request.

Evaluation returns the exact loss, accuracy and F1 of whatever adapter the coordinator sends,
on the site's test rows, in the clear: unlimited, that is a query oracle on the site's data. The
site decides: ``answer-evaluation`` (default true) and ``max-evaluations-per-run`` (default: one
per round of the run). Answers are counted per run id in ``evaluations.json`` in the site's
state folder, under a lock, so the count survives Flower's fresh process per message. The
run's rounds are fixed the first time the site sees the run: a coordinator that raises
``rounds`` mid-run does not raise the cap.

Limit: the run id is the coordinator's to choose, so a coordinator that starts a new run (or
claims one) gets a new allowance. The cap bounds evaluations per run, not in total; a site that
wants none sets ``answer-evaluation = false``.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fedtune.io_utils import atomic_write_json

COUNTS_FILE = "evaluations.json"


@dataclass(frozen=True)
class EvaluationDecision:
    answer: bool
    used: int                 # evaluations answered in this run, this one included if answered
    limit: Optional[int]      # None: the site does not answer evaluation at all
    reason: str = ""


class EvaluationAllowance:
    def __init__(self, state_folder: Path):
        self.path = Path(state_folder) / COUNTS_FILE
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def counts(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            # A damaged count must not reopen the oracle: treat every run as spent.
            return {"*": {"corrupt": True}}
        return data if isinstance(data, dict) else {"*": {"corrupt": True}}

    def take(self, run_id: str, rounds: int, answer_evaluation: bool = True,
             max_per_run: Optional[int] = None) -> EvaluationDecision:
        """Count one evaluation of ``run_id`` if the site's settings still allow it."""
        if not answer_evaluation:
            return EvaluationDecision(False, 0, None, "this site does not answer evaluation requests")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            data = self.counts()
            if "*" in data:
                return EvaluationDecision(False, 0, 0, f"{self.path.name} is damaged; answering no evaluation")
            run = data.setdefault(run_id, {"rounds": int(rounds), "count": 0})
            limit = max_per_run if max_per_run is not None else int(run["rounds"])
            if run["count"] >= limit:
                return EvaluationDecision(False, run["count"], limit,
                                          f"run {run_id}: {run['count']} of {limit} evaluations already answered")
            run["count"] += 1
            atomic_write_json(self.path, data)
            return EvaluationDecision(True, run["count"], limit)

    @contextmanager
    def _locked(self):
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
