"""``privacy.md``: the run's privacy report in words a site admin or auditor can read."""

from __future__ import annotations

from pathlib import Path

from fedtune.io_utils import atomic_write_text
from fedtune.privacy.display import format_epsilon

PROTECTED = """\
## What is protected

- **Sample-level differential privacy at each site.** Every site trains with DP-SGD (Opacus):
  Poisson sampling, each example's gradient clipped to `max_grad_norm`, Gaussian noise of
  `noise_multiplier` x `max_grad_norm` added to every step. The epsilon above bounds what any
  output of the site (its adapter updates, hence the final model) reveals about any one of its
  examples, at the stated delta. It is computed by the site's accountant over every step of the
  run (and, in "total", over every earlier run on the same data), never estimated.
- **Secure aggregation (SecAgg+)** hides each site's adapter update from the coordinator, which
  learns the sum over the sites of a round. Each site refuses a round whose settings would let
  the coordinator unmask it (fewer than its `secagg-min-neighbours` sites in its neighbour set, a
  reconstruction threshold at or below half the shares, overlapping or foreign node lists,
  another mask generator), and masks come from SHAKE-256 of the full seed. Limits: with two sites
  each learns the other's update from the sum; the coordinator registers the sites' keys, so
  sites of its own in a round could leave one real site's update exposed (still DP-noised).
- **Which rows a site trains on** is its own: its local test split and the rows kept per privacy
  unit come from a keyed hash with the site's secret, so one row more or less moves no other,
  and the coordinator cannot move them. Its delta is its own (fixed per dataset in its ledger).
- **Raw data never leaves a site**: no text, token ids, labels or gradients are sent; a test
  captures every message a site sends and checks this.

## What still travels in the clear

SecAgg+ masks only the adapter update. Everything below reaches the coordinator unmasked; only
the evaluation answers are covered by the DP guarantee:

- **With every train reply** (`SiteReport`): the site's name, its epsilon for this run and in
  total, delta, noise multiplier, clip norm, sample rate (batch size / training rows, so it
  reveals the site's size), the number of DP steps and the accountant; with a privacy unit, the
  rows per unit and the unit-level epsilon and delta. The example count travels inside the
  SecAgg+ sum. The un-noised **train loss** and the count of **values SecAgg+ clipped** are sent
  only by sites that opt in (`report-train-loss`, `report-clipping`); by default they stay at
  the site.
- **With every evaluation the site answers** (`SiteEvalReport`): sums over its local test rows,
  each with Gaussian noise the site calibrated and recorded in its ledger (covered by its epsilon,
  composed in parallel with training): the row count and the correct count (classification) or
  the sum of clipped per-row losses (generation), and the dataset's epsilon. A site answers only
  for a run it trained, at most `max-evaluations` times per dataset over all runs (default 50)
  and none with `answer-evaluation = false`; a declined request is answered with 0 examples and
  `declined`. The federated metrics in this run folder are those noised sums, added up and
  divided by the coordinator; the central evaluation is exact.
- **When a site refuses or fails**: one short generic line, e.g. `site-2: refused (privacy
  budget)`, `site-2: refused (site policy)`, `site-2: data error`, `site-2: internal error`. The
  full message (file paths, row numbers, column names, label values) stays in the site's log
  (`site.log` in its state folder).
- **Metadata**: which sites answered which round, message sizes and timing, SecAgg+ key material.

## What is not protected

- The **global model after each round** is seen by the coordinator and every site; its privacy
  is the DP guarantee above, not secrecy.
- The guarantees hold against an **honest-but-curious coordinator**: one that runs fedtune's code
  as written. The coordinator chooses the code a site runs (see the README's threat model).
"""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_privacy_report(privacy: dict, path: Path) -> None:
    sites = privacy.get("sites", {})
    lines = ["# Privacy report", ""]
    if not privacy.get("enabled", True):
        lines += ["**Differential privacy was off for this run: there is no DP guarantee.**", ""]
    secure = privacy.get("secure_aggregation")
    lines += [
        f"Target per site: epsilon {_fmt(privacy.get('target_epsilon'))} at delta {_fmt(privacy.get('delta'))}. "
        f"Secure aggregation: {'SecAgg+' if secure else 'off (updates were sent in the clear)'}.",
        "",
        "| site | epsilon (this run) | epsilon (total) | delta | noise multiplier | clip norm | sample rate | steps | accountant |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for site in sorted(sites):
        s = sites[site]
        acc = s.get("accountant")
        lines.append(
            f"| {site} | {format_epsilon(s.get('epsilon'), acc)} | "
            f"{format_epsilon(s.get('epsilon_total', s.get('epsilon')), acc)} | "
            f"{_fmt(s.get('delta'))} | {_fmt(s.get('noise_multiplier'))} | {_fmt(s.get('max_grad_norm'))} | "
            f"{_fmt(s.get('sample_rate'))} | {_fmt(s.get('steps'))} | {s.get('accountant', '-')} |"
        )
    units = {site: s for site, s in sites.items() if s.get("rows_per_unit")}
    if units:
        lines += ["", "Sites that bound each privacy unit (e.g. a patient) to k rows; the accountant counts rows, "
                  "so a unit's guarantee is the group-privacy conversion (k x epsilon, k e^((k-1) epsilon) delta):", "",
                  "| site | rows per unit (k) | epsilon for one unit | delta for one unit |", "|---|---|---|---|"]
        for site in sorted(units):
            s = units[site]
            lines.append(f"| {site} | {s['rows_per_unit']} | {format_epsilon(s.get('epsilon_unit'), s.get('accountant'))} "
                         f"| {format_epsilon(s.get('delta_unit'))} |")
    refused = privacy.get("refused") or {}
    if refused:
        lines += ["", "Sites that refused to train (and were left out of later rounds):", ""]
        lines += [f"- {site}: round {info}" for site, info in sorted(refused.items())]
    lines += ["", PROTECTED]
    atomic_write_text(Path(path), "\n".join(lines))
