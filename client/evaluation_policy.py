"""Whether and how a site answers a federated-evaluation request: privately, or not at all.

An evaluation answer is computed on the site's test rows with whatever adapter the coordinator
sends, so unaccounted it is an exact query oracle on those rows. A site answers only when all of
these hold, decided under its ledger's lock:

- its own ``answer-evaluation`` is true;
- it has accepted a training plan for this run (the run has a training entry in its ledger): a
  fresh run id buys no answer without spending training budget first;
- the dataset has had fewer than ``max-evaluations`` answers over all runs (its ledger counts);
- the answer, composed with every earlier answer on the dataset, stays within the site's
  ``lifetime-epsilon``.

Each answer is released with Gaussian noise (fedtune/privacy/release.py) at the noise multiplier
that makes ``max-evaluations`` answers together fit ``lifetime-epsilon`` at the dataset's delta,
and is appended to the ledger (``kind = "evaluate"``) before it leaves the site. Test and
training rows are disjoint by the keyed-hash split, so evaluation and training compose in
parallel (fedtune/privacy/composition.py): each side stays within the lifetime cap, and so does
the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from fedtune.privacy.accounting import calibrate_noise_multiplier
from fedtune.privacy.composition import compose, dataset_epsilon, sequential
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger

_TOLERANCE = 1e-9


@dataclass
class EvaluationGrant:
    """One answer the site allows: release with ``noise`` and ``record`` it before it leaves."""

    answer: bool
    reason: str = ""
    noise: float = 0.0
    epsilon_total: float = 0.0   # the dataset's epsilon (training and evaluation) with this answer
    _record: Optional[Callable[[], LedgerEntry]] = field(default=None, repr=False)

    def record(self) -> LedgerEntry:
        if self._record is None:
            raise RuntimeError("this evaluation grant was already recorded (or is a refusal)")
        entry, self._record = self._record(), None
        return entry


def evaluation_noise(max_evaluations: int, lifetime_epsilon: float, delta: float, mechanism: str) -> float:
    """The noise multiplier at which ``max_evaluations`` answers compose to ``lifetime_epsilon``."""
    return calibrate_noise_multiplier(lifetime_epsilon, delta, 1.0, max(1, max_evaluations), mechanism)


class EvaluationBudget:
    """One site's evaluation answers on one dataset, decided and recorded in its ledger."""

    def __init__(self, ledger: PrivacyLedger, dataset: str, fingerprint: Optional[str], *, answer_evaluation: bool,
                 max_evaluations: int, lifetime_epsilon: float, rows_per_unit: int = 1):
        self.ledger, self.dataset, self.fingerprint = ledger, dataset, fingerprint
        self.answer_evaluation, self.max_evaluations = answer_evaluation, max_evaluations
        self.lifetime_epsilon, self.rows_per_unit = lifetime_epsilon, max(1, rows_per_unit)

    @contextmanager
    def answer(self, run_id: str, rnd: int) -> Iterator[EvaluationGrant]:
        """Hold the ledger's lock, decide, and yield the grant; the caller computes, noises and
        calls ``grant.record()`` inside the ``with`` (a refusal: ``grant.answer`` is False)."""
        if not self.answer_evaluation:
            yield EvaluationGrant(False, "this site does not answer evaluation requests (answer-evaluation = false)")
            return
        with self.ledger.locked():
            entries = [e for e in self.ledger.entries() if e.of_dataset(self.dataset, self.fingerprint)]
            yield self._decide(entries, run_id, rnd)

    def _decide(self, entries: list[LedgerEntry], run_id: str, rnd: int) -> EvaluationGrant:
        trained = [e for e in entries if not e.is_evaluation and e.run_id == run_id]
        if not trained:
            return EvaluationGrant(False, f"run {run_id}: no training plan accepted for this run on this dataset")
        answers = [e for e in entries if e.is_evaluation]
        if len(answers) >= self.max_evaluations:
            return EvaluationGrant(False, f"dataset '{self.dataset}': {len(answers)} of {self.max_evaluations} "
                                          "evaluations already answered (max-evaluations, over all runs)")
        delta = next((e.dataset_delta for e in entries if e.dataset_delta is not None), None) or min(
            e.delta for e in entries)
        mechanism = trained[-1].accountant
        cap = self.lifetime_epsilon / self.rows_per_unit  # a unit of k rows: k times a row's epsilon
        try:
            noise = evaluation_noise(self.max_evaluations, cap, delta, mechanism)
        except ValueError:
            return EvaluationGrant(False, f"no noise fits {self.max_evaluations} evaluations within epsilon {cap:g}")
        fields = {"dataset": self.dataset, "run_id": run_id, "round": rnd, "steps": 1, "sample_rate": 1.0,
                  "noise_multiplier": noise, "max_grad_norm": 1.0, "delta": delta, "accountant": mechanism,
                  "fingerprint": self.fingerprint, "dataset_delta": delta, "kind": "evaluate",
                  "rows_per_unit": self.rows_per_unit if self.rows_per_unit > 1 else None}
        after = [*entries, LedgerEntry.model_construct(**fields)]
        # The evaluation side alone (parallel with training), or everything (k > 1: sequential).
        spent = dataset_epsilon(after, delta) if sequential(after) else compose(
            [e for e in after if e.is_evaluation], delta)
        if spent > cap * (1 + _TOLERANCE):
            return EvaluationGrant(False, f"dataset '{self.dataset}': this answer would take its evaluations past "
                                          f"epsilon {cap:g} (lifetime-epsilon)")
        grant = EvaluationGrant(True, noise=noise, epsilon_total=dataset_epsilon(after, delta))
        grant._record = lambda: self.ledger.append({k: v for k, v in fields.items() if v is not None})
        return grant
