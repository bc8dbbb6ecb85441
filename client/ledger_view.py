"""``fedtune ledger show``: a site's own view of its privacy budget, from its ledger alone.

Every epsilon here is recomputed with the accountant from the ledger's entries (noise, sample
rate, steps), never read from a stored number or from what a run reported: per dataset (all
runs composed; training and noised evaluation answers composed as fedtune/privacy/composition.py
says) and per run (its training). The lifetime cap comes from the site's settings; the hash chain is
verified, and a ledger that fails verification is still listed, marked unverified, with a
non-zero exit status.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ValidationError

from fedtune.privacy.display import format_epsilon
from fedtune.privacy.group import group_privacy
from fedtune.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger

LEDGER_FILE = "privacy-ledger.jsonl"


class RunView(BaseModel):
    run_id: str
    rounds: list[int]
    steps: int
    epsilon: float


class DatasetView(BaseModel):
    dataset: str
    entries: int
    delta: float
    accountant: str
    epsilon: float                  # the file's: training and evaluation composed (privacy/composition.py)
    epsilon_training: float = 0.0
    epsilon_evaluation: float = 0.0
    evaluations: int = 0            # noised evaluation answers, over all runs
    composition: str = "parallel"   # or "sequential" (a privacy unit of k > 1 rows)
    lifetime_cap: Optional[float]
    left: Optional[float]
    rows_per_unit: int = 1
    epsilon_unit: Optional[float] = None
    delta_unit: Optional[float] = None
    runs: list[RunView]


class RunReview(BaseModel):
    """A run this site accepted or refused before answering it (client/approval.py)."""

    run_id: str
    time: str
    accepted: bool
    bundle: str
    reason: str = ""


class LedgerView(BaseModel):
    path: str
    verified: bool
    problem: Optional[str] = None
    entries: int
    datasets: list[DatasetView]
    runs_reviewed: list[RunReview] = []


def lifetime_cap_from_settings(settings_file: Optional[Path]) -> Optional[float]:
    """The site's lifetime cap: ``lifetime-epsilon`` in its settings file, else the site
    agent's default."""
    from .settings import SiteSettings

    default = SiteSettings.model_fields["lifetime_epsilon"].default
    if settings_file is None:
        return default
    raw = tomllib.loads(Path(settings_file).read_text(encoding="utf-8"))
    value = raw.get("lifetime-epsilon", raw.get("lifetime_epsilon", default))
    return float(value) if value is not None else None


def ledger_view(state_dir: Path, lifetime_cap: Optional[float] = None, delta: Optional[float] = None) -> LedgerView:
    ledger = PrivacyLedger(Path(state_dir) / LEDGER_FILE)
    try:
        entries, verified, problem = ledger.entries(), True, None
    except LedgerError as err:
        entries, verified, problem = _unverified_entries(ledger.path), False, str(err)
    datasets = []
    for name in dict.fromkeys(e.dataset for e in entries):
        datasets.append(_dataset_view(name, [e for e in entries if e.dataset == name], lifetime_cap, delta))
    from .approval import run_decisions

    reviewed = [RunReview(**d.model_dump(include={"run_id", "time", "accepted", "bundle", "reason"}))
                for d in run_decisions(state_dir)]
    return LedgerView(path=str(ledger.path), verified=verified, problem=problem, entries=len(entries),
                      datasets=datasets, runs_reviewed=reviewed)


def _dataset_view(name: str, entries: list[LedgerEntry], cap: Optional[float], delta: Optional[float]) -> DatasetView:
    # The dataset's delta as the site fixed it at first use (client/budget.py); in older ledgers,
    # the smallest delta any entry was trained at (the largest, most honest epsilon).
    recorded = next((e.dataset_delta for e in entries if e.dataset_delta is not None), None)
    delta = delta if delta is not None else recorded if recorded is not None else min(e.delta for e in entries)
    from fedtune.privacy.composition import compose, dataset_epsilon, sequential

    mechanisms = sorted({e.accountant for e in entries})
    trained = [e for e in entries if not e.is_evaluation]
    answers = [e for e in entries if e.is_evaluation]
    epsilon = dataset_epsilon(entries, delta)
    runs = []
    for run_id in dict.fromkeys(e.run_id for e in trained):
        mine = [e for e in trained if e.run_id == run_id]
        runs.append(RunView(run_id=run_id, rounds=[e.round for e in mine], steps=sum(e.steps for e in mine),
                            epsilon=compose(mine, delta)))
    k = max((e.rows_per_unit or 1) for e in entries)
    unit = group_privacy(epsilon, delta, k) if k > 1 else (None, None)
    left = None if cap is None else max(0.0, cap - epsilon) if math.isfinite(epsilon) else 0.0
    return DatasetView(dataset=name, entries=len(entries), delta=delta, accountant="/".join(mechanisms),
                       epsilon=epsilon, epsilon_training=compose(trained, delta),
                       epsilon_evaluation=compose(answers, delta), evaluations=len(answers),
                       composition="sequential" if sequential(entries) else "parallel",
                       lifetime_cap=cap, left=left, rows_per_unit=k, epsilon_unit=unit[0],
                       delta_unit=unit[1], runs=runs)


def _unverified_entries(path: Path) -> list[LedgerEntry]:
    """Every line that still parses as an entry, for display only (the chain did not verify)."""
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(LedgerEntry.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError):
            continue
    return out


def format_ledger_view(view: LedgerView) -> str:
    lines = [f"ledger {view.path}: {view.entries} entries"]
    if view.verified:
        lines.append("hash chain: verified")
    else:
        lines.append(f"hash chain: DOES NOT VERIFY ({view.problem})")
        lines.append("the entries below are the lines that still parse; they cannot be trusted")
    if not view.datasets:
        lines.append("no DP training recorded")
    for d in view.datasets:
        cap = "none" if d.lifetime_cap is None else f"{d.lifetime_cap:g}"
        left = "-" if d.left is None else f"{d.left:.4g}"
        lines += ["", f"dataset {d.dataset}", f"  epsilon spent {format_epsilon(d.epsilon)} at delta {d.delta:g} "
                  f"({d.accountant}, recomputed from {d.entries} entries); lifetime cap {cap}; left {left}",
                  f"  training {format_epsilon(d.epsilon_training)}, evaluation {format_epsilon(d.epsilon_evaluation)} "
                  f"({d.evaluations} noised answers), composed {d.composition}ly"
                  + (" (test and training rows are disjoint: the larger of the two)" if d.composition == "parallel"
                     else " (a privacy unit's rows may be on both sides: one history)")]
        if d.rows_per_unit > 1:
            lines.append(f"  per privacy unit (up to {d.rows_per_unit} rows): epsilon {format_epsilon(d.epsilon_unit)}"
                         f" at delta {format_epsilon(d.delta_unit)} (group privacy)")
        header = ["run", "rounds", "steps", "epsilon"]
        rows = [[r.run_id, _rounds(r.rounds), str(r.steps), format_epsilon(r.epsilon)] for r in d.runs]
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += ["", f"runs reviewed before answering: {len(view.runs_reviewed)}"]
    for r in view.runs_reviewed:
        verdict = "accepted" if r.accepted else f"REFUSED ({r.reason})"
        lines.append(f"  {r.time}  run {r.run_id}  bundle {r.bundle[:16]}  {verdict}")
    return "\n".join(lines)


def _rounds(rounds: list[int]) -> str:
    if rounds == list(range(rounds[0], rounds[0] + len(rounds))):
        return f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else str(rounds[0])
    return ",".join(str(r) for r in rounds)
