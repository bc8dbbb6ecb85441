"""``privacy.md``: the run's privacy report in words a site admin or auditor can read."""

from __future__ import annotations

from pathlib import Path

from fedtune.io_utils import atomic_write_text

PROTECTED = """\
## What is protected

- **Sample-level differential privacy at each site.** Every site trains with DP-SGD (Opacus):
  Poisson sampling, each example's gradient clipped to `max_grad_norm`, Gaussian noise of
  `noise_multiplier` x `max_grad_norm` added to every step. The epsilon above bounds what any
  output of the site (its adapter updates, hence the final model) reveals about any one of its
  examples, at the stated delta. It is computed by the site's accountant over every step of the
  run (and, in "total", over every earlier run on the same data), never estimated.
- **Secure aggregation (SecAgg+)** hides each site's adapter update from the coordinator: the
  coordinator only learns the sum over the sites of a round.
- **Raw data never leaves a site**: no text, token ids, labels or gradients are sent; a test
  captures every message a site sends and checks this.

## What is not protected

- The **metrics a site reports in the clear**: its example count, train loss, epsilon and the
  accuracy / loss of the global model on its local test split. These are aggregates, but they are
  not covered by the DP guarantee.
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
        lines.append(
            f"| {site} | {_fmt(s.get('epsilon'))} | {_fmt(s.get('epsilon_total', s.get('epsilon')))} | "
            f"{_fmt(s.get('delta'))} | {_fmt(s.get('noise_multiplier'))} | {_fmt(s.get('max_grad_norm'))} | "
            f"{_fmt(s.get('sample_rate'))} | {_fmt(s.get('steps'))} | {s.get('accountant', '-')} |"
        )
    refused = privacy.get("refused") or {}
    if refused:
        lines += ["", "Sites that refused to train (and were left out of later rounds):", ""]
        lines += [f"- {site}: round {info}" for site, info in sorted(refused.items())]
    lines += ["", PROTECTED]
    atomic_write_text(Path(path), "\n".join(lines))
