"""``fedtune audit``: one real federated run with canaries in one site, scored afterwards.

Top to bottom: pick the audited site; write canaries from the model's own vocabulary and draw
their inclusion bits (secure source, kept out of the run); run the same simulation as
``fedtune simulate`` with the included canaries joined to that site's training rows (the site
builds them in like its own rows); score every canary by how much the final global model's loss
on it fell against the initial model's; guess the top k included and the bottom k excluded; turn
the right guesses into a lower bound on epsilon (fedtune/audit/bounds.py) and compare it with
the epsilon recomputed from the audited site's ledger.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel

from fedtune.audit.bounds import lower_bounds
from fedtune.audit.canaries import CANARY_ENV, inclusion_bits, make_canaries, write_included
from fedtune.config import FedTuneConfig
from fedtune.data.cleaning import ROW
from fedtune.errors import ConfigError
from fedtune.io_utils import atomic_write_json, atomic_write_text

CONFIDENCE = 0.99
# Guesses per side tried, as shares of the canaries; the confidence is split between them
# (Bonferroni), so trying several costs a little power and never validity.
GUESS_SHARES = (0.05, 0.1, 0.25)


class AuditResult(BaseModel):
    epsilon: Optional[float]          # the accountant's, from the audited site's ledger (None: no DP)
    epsilon_lower_bound: float        # the larger of the two bounds below
    epsilon_lower_bound_steinke: float
    epsilon_lower_bound_fdp: float
    delta: float
    canaries: int
    included: int
    guesses: int                      # k "in" + k "out"
    correct: int
    confidence: float
    site: str
    score: str = "loss decrease on the canary, initial model minus final global model (centred per label)"
    violated: bool                    # the lower bound exceeds the accountant's epsilon: a privacy bug


@dataclass
class Guesses:
    guesses: int
    correct: int
    bounds: dict


def audited_site(cfg: FedTuneConfig, site: Optional[str]) -> str:
    names = [f"site-{i}" for i in range(cfg.federation.sites)]
    if site is None:
        return names[0]
    if site not in names:
        raise ConfigError(f"--site {site}: not a site of this run (its sites: {', '.join(names)})")
    return site


def best_guesses(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float,
                 shares=GUESS_SHARES) -> Guesses:
    """The k highest scores guessed in and the k lowest out, for each k tried; the one with the
    largest bound, each computed at its share of the confidence."""
    m = len(scores)
    order = np.argsort(scores, kind="stable")
    each = 1 - (1 - confidence) / len(shares)
    best: Optional[Guesses] = None
    for k in sorted({max(1, int(m * s)) for s in shares}):
        k = min(k, m // 2)
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        found = Guesses(2 * k, correct, lower_bounds(m, 2 * k, correct, delta, each))
        if best is None or found.bounds["epsilon_lower_bound"] > best.bounds["epsilon_lower_bound"]:
            best = found
    return best


def canary_scores(cfg: FedTuneConfig, run_dir: Path, canaries: pd.DataFrame, columns: list[str],
                  label_map) -> np.ndarray:
    """Per canary: its loss under the run's initial model minus its loss under the final global
    model (the coordinator's own model and checkpoint, as central evaluation builds them); for
    classification, centred per label."""
    from fedtune.adapters import set_adapter_arrays
    from fedtune.evaluation import row_values
    from fedtune.server.central_eval import CentralEvaluator
    from fedtune.server.checkpoints import load_latest

    latest = load_latest(run_dir / "checkpoints")
    if latest is None:
        raise RuntimeError(f"{run_dir}: the run left no checkpoint to score the canaries with")
    evaluator = CentralEvaluator(cfg, canaries, columns, label_map, "audit canaries")
    task, batch = cfg.model.task, cfg.train.eval_batch_size

    def losses() -> np.ndarray:
        return row_values(evaluator.model, evaluator.dataset, evaluator.collate, task, evaluator.device,
                          "fp32", batch)["loss"]

    before = losses()  # the initial adapter, from the run's seed (as every site starts)
    set_adapter_arrays(evaluator.model, latest[1])
    fell = before - losses()
    if label_map is None:
        return fell
    # Centred per label: a global model that drifts towards one class lowers the loss of every
    # canary with that label, trained on or not. The centring uses no inclusion bit.
    labels = canaries[columns[1]].to_numpy()
    for label in np.unique(labels):
        fell[labels == label] -= fell[labels == label].mean()
    return fell


def check_canaries_joined(site_log: Path, site: str, included: int) -> None:
    """Raises unless the audited site said it trained with the included canaries: a run that
    never saw them would yield a bound near 0 that reads like a clean bill of health."""
    said = f"{site}: {included} audit canaries join"
    text = site_log.read_text(encoding="utf-8", errors="replace") if site_log.is_file() else ""
    if said not in text:
        raise RuntimeError(f"{site} never joined the {included} included canaries to its rows (no "
                           f"'{said}' in {site_log}): nothing was audited")


def ledger_epsilon(run_dir: Path, site: str, delta: float) -> Optional[float]:
    """The audited site's training epsilon for this run, recomputed from its ledger file by the
    accountant (None without DP)."""
    from fedtune.privacy.composition import compose
    from fedtune.privacy.ledger import PrivacyLedger

    entries = [e for e in PrivacyLedger(run_dir / "sites" / site / "privacy-ledger.jsonl").entries()
               if not e.is_evaluation]
    if not entries:
        raise RuntimeError(f"{site} recorded no training in its ledger: nothing was audited")
    eps = compose(entries, delta)
    return None if math.isinf(eps) else eps


def run_audit(cfg: FedTuneConfig, out: Path, canaries: int = 1000, site: Optional[str] = None,
              confidence: float = CONFIDENCE, bits: Optional[np.ndarray] = None, verbose: bool = False,
              seed: Optional[int] = None) -> AuditResult:
    """The whole audit; writes ``out/audit.json``, ``out/audit.md``, ``out/audit-scores.png``,
    ``out/canaries.csv`` (after the run) and the run itself in ``out/run``. ``bits`` and ``seed``
    fix the inclusion bits and the canary texts (tests only)."""
    from fedtune.console import RunView
    from fedtune.federation.dataset import federated_rows
    from fedtune.model import load_tokenizer
    from fedtune.run_logs import route_logs
    from fedtune.simulate import simulate

    if canaries < 20:
        raise ConfigError(f"--canaries {canaries}: an audit needs at least 20 canaries")
    out = Path(out)
    run_dir = out / "run"
    if run_dir.exists():
        raise ConfigError(f"{out} already holds an audit: pass a new --out")
    name = audited_site(cfg, site)
    rows = federated_rows(cfg)
    if rows.label_map is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": rows.label_map.labels})})
    if cfg.federation.secure_aggregation and not cfg.federation.secagg_max_weight:
        # SecAgg+'s weight bound from the rows plus every canary (not only the included ones: the
        # coordinator learns nothing about the coins from it).
        from fedtune.federation.preflight import weight_bucket

        bound = float(weight_bucket(max(len(s) for s in rows.sites) + canaries))
        cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"secagg_max_weight": bound})})
    labels = rows.label_map.labels if rows.label_map is not None else None
    canary_rows = make_canaries(canaries, load_tokenizer(cfg.model), cfg.model.task, rows.columns, labels, seed)
    included = inclusion_bits(canaries) if bits is None else np.asarray(bits, dtype=bool)
    if len(included) != canaries:
        raise ValueError(f"{len(included)} inclusion bits for {canaries} canaries")

    out.mkdir(parents=True, exist_ok=True)
    route_logs(run_dir / "logs", "simulate", verbose)
    with tempfile.TemporaryDirectory(prefix="fedtune-audit-") as private:
        handed = write_included(Path(private) / "canaries.json", name, canary_rows, included)
        with RunView(cfg, run_dir, "simulate"):
            ended = simulate(cfg, run_dir, verbose=verbose, site_env={CANARY_ENV: str(handed)})
    if ended != "completed":
        raise RuntimeError(f"the audited run {ended}; see {run_dir / 'logs'}")
    check_canaries_joined(run_dir / "logs" / "sites.log", name, int(included.sum()))

    scores = canary_scores(cfg, run_dir, canary_rows, rows.columns, rows.label_map)
    delta = cfg.privacy.target_delta
    epsilon = ledger_epsilon(run_dir, name, delta)
    found = best_guesses(scores, included, delta, confidence)
    bound = found.bounds["epsilon_lower_bound"]
    result = AuditResult(
        epsilon=epsilon, epsilon_lower_bound=bound, epsilon_lower_bound_steinke=found.bounds["steinke"],
        epsilon_lower_bound_fdp=found.bounds["fdp"], delta=delta, canaries=canaries,
        included=int(included.sum()), guesses=found.guesses, correct=found.correct, confidence=confidence,
        site=name, violated=epsilon is not None and bound > epsilon,
    )
    table = canary_rows.drop(columns=[ROW]).assign(included=included, score=scores)
    table.to_csv(out / "canaries.csv", index=False)
    atomic_write_json(out / "audit.json", result.model_dump())
    plot_scores(scores, included, out / "audit-scores.png", result)
    atomic_write_text(out / "audit.md", audit_markdown(result, cfg))
    return result


def draw_scores(ax, scores: np.ndarray, included: np.ndarray) -> None:
    """Histograms of the included and the excluded canaries' scores on one axis."""
    scores, included = np.asarray(scores), np.asarray(included, dtype=bool)
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({int(included.sum())})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({int((~included).sum())})")
    ax.grid(alpha=0.3)


def plot_scores(scores: np.ndarray, included: np.ndarray, path: Path, result: AuditResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_scores(ax, scores, included)
    ax.set_xlabel("score: canary loss before training minus after (higher: more likely trained on)")
    ax.set_ylabel("canaries")
    eps = "no DP" if result.epsilon is None else f"accountant epsilon {result.epsilon:.2f}"
    ax.set_title(f"{result.site}: lower bound {result.epsilon_lower_bound:.2f} ({eps})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(result: AuditResult) -> str:
    if result.epsilon is None:
        return (f"Training ran without DP (the site allowed it), so no epsilon was claimed; the audit "
                f"measured at least {result.epsilon_lower_bound:.2f}.")
    if result.violated:
        return (f"PRIVACY BUG: the measured lower bound {result.epsilon_lower_bound:.2f} exceeds the epsilon "
                f"{result.epsilon:.2f} the accountant reports for {result.site}. The training leaked more "
                "than its accounting says (noise, clipping or sampling not as accounted).")
    return (f"Consistent: the lower bound {result.epsilon_lower_bound:.2f} is at or below the accountant's "
            f"epsilon {result.epsilon:.2f}. This attack found no leak beyond the accounting; it does not "
            "prove the accounting tight or the training private.")


def audit_markdown(result: AuditResult, cfg: FedTuneConfig) -> str:
    eps = "none (no DP)" if result.epsilon is None else f"{result.epsilon:.3f}"
    return f"""# Privacy audit (one run)

{verdict(result)}

| | |
|---|---|
| audited site | {result.site} |
| accountant epsilon (from its ledger, canaries counted in its rows) | {eps} |
| delta | {result.delta:g} |
| canaries (included) | {result.canaries} ({result.included}) |
| guesses, right | {result.guesses}, {result.correct} |
| lower bound on epsilon, at {result.confidence:.0%} confidence | **{result.epsilon_lower_bound:.3f}** |
| Steinke et al. (2023) bound | {result.epsilon_lower_bound_steinke:.3f} |
| f-DP bound, Gaussian curve (Mahloujifar et al. 2024) | {result.epsilon_lower_bound_fdp:.3f} |
| run | {cfg.model.name}, {cfg.federation.sites} sites, {cfg.federation.rounds} rounds, SecAgg+ {cfg.federation.secure_aggregation} |

![canary scores](audit-scores.png)

## What this number means

Each canary was trained on with probability 1/2 (secure coin, unknown to the run). After the run
the auditor scored each by how much the final global model's loss on it fell, guessed the
highest-scoring half of its guesses "trained on" and the lowest "not", and counted right guesses.
A training run that were epsilon-DP could produce this many right guesses only with probability
below {1 - result.confidence:.0%}, for every epsilon below the bound.

What it does not mean: it is a lower bound from one attack, not a proof of privacy. It is capped
by the number of guesses (with all {result.guesses} right it could not exceed about
{_cap(result):.1f}), so it catches gross failures (DP off, noise or clipping missing), not a small
overspend; and canaries are worst-case-looking rows, not the site's own. The f-DP bound refutes
"as private as a Gaussian mechanism at this (epsilon, delta)", which DP-SGD is close to.
"""


def _cap(result: AuditResult) -> float:
    return lower_bounds(result.canaries, result.guesses, result.guesses, result.delta,
                        result.confidence)["epsilon_lower_bound"]
