"""PNG plots of a run: central (and federated) metrics, and each site's epsilon, per round."""

from __future__ import annotations

import re
from pathlib import Path

METRICS = ("accuracy", "exact_match", "f1", "loss", "perplexity")


def _points(records: list[dict], key: str, metric: str) -> list[tuple[int, float]]:
    # A record may have key None (no evaluation that round) or lack the metric.
    pts = [(r["round"], (r.get(key) or {}).get(metric)) for r in records]
    return [(x, y) for x, y in pts if y is not None]


def _site_order(site: str):
    # site-2 before site-10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", site)]


def _style(ax, title: str, ylabel: str, rounds: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel(ylabel)
    # A fixed span of at least one round: with a single round matplotlib would zoom in to
    # fractional ticks (-0.04 ... 0.04) that the integer locator cannot avoid.
    if rounds:
        lo, hi = min(rounds), max(max(rounds), min(rounds) + 1)
        ax.set_xlim(lo - 0.05 * (hi - lo) - 0.1, hi + 0.05 * (hi - lo) + 0.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.3, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def write_plots(records: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in site processes
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in records if r.get("round") is not None]

    present = [m for m in METRICS if _points(records, "central", m)]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.5 * max(1, len(present)), 3.8),
                             squeeze=False, layout="constrained")
    for ax, metric in zip(axes[0], present):
        for key, style, label in (("central", "-o", "central (coordinator's eval set)"),
                                  ("federated", "--s", "federated (sites' own test rows)")):
            pts = _points(records, key, metric)
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=4)
        ys = [y for _, y in _points(records, "central", metric)]
        if metric == "perplexity" and min(ys) > 0 and max(ys) / min(ys) > 50:
            ax.set_yscale("log")  # the untrained model's perplexity dwarfs the rest
        _style(ax, metric, metric, rounds)
        ax.legend(fontsize=8)
    if not present:
        _style(axes[0][0], "central evaluation", "", rounds)
        _empty(axes[0][0], "no central metrics recorded")
    central = folder / "central.png"
    fig.savefig(central, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    sites = sorted({s for r in records for s in (r.get("sites") or {})}, key=_site_order)
    # The default cycle repeats after 10 colours: site-0 and site-10 would look alike.
    cmap = plt.get_cmap("tab10" if len(sites) <= 10 else "tab20" if len(sites) <= 20 else "viridis")
    colors = [cmap(i if len(sites) <= 20 else i / max(1, len(sites) - 1)) for i in range(len(sites))]
    drawn = 0
    for site, color in zip(sites, colors):
        # A site not sampled in a round has no entry: its line skips that round.
        pts = [(r["round"], (r["sites"][site] or {}).get("epsilon")) for r in records
               if site in (r.get("sites") or {})]
        # inf (noise 0) or no DP cannot be drawn: they are in the summary and privacy.md as such.
        pts = [(x, y) for x, y in pts if isinstance(y, (int, float))]
        if pts:
            ax.plot(*zip(*pts), "-o", label=site, markersize=4, color=color)
            drawn += 1
    targets = [r["target_epsilon"] for r in records if r.get("target_epsilon") is not None]
    if targets:
        ax.axhline(targets[-1], linestyle=":", color="black", label=f"target {targets[-1]:g}")
    ax.set_ylim(bottom=0)  # epsilon only grows from 0: show the budget used in proportion
    _style(ax, "privacy spent per site", "epsilon (cumulative)", rounds)
    if drawn or targets:
        # Outside the axes, in columns, so many sites do not cover the lines.
        fig.legend(fontsize=7, loc="outside right upper", ncol=1 + (drawn + 1) // 16)
    if not drawn:
        _empty(ax, "no epsilon recorded (DP off, or no round finished)")
    eps = folder / "epsilon.png"
    fig.savefig(eps, dpi=110)
    plt.close(fig)
    return [central, eps]
