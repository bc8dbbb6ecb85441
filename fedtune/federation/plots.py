"""PNG plots of a run: central (and federated) metrics, and each site's epsilon, per round."""

from __future__ import annotations

from pathlib import Path

METRICS = ("accuracy", "f1", "loss", "perplexity")


def write_plots(records: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    present = [m for m in METRICS if any(m in (r.get("central") or {}) for r in records)]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.5 * max(1, len(present)), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for key, style, label in (("central", "-o", "central"), ("federated", "--s", "federated (sites' test splits)")):
            pts = [(r["round"], (r.get(key) or {}).get(metric)) for r in records]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    central = folder / "central.png"
    fig.savefig(central, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sites = sorted({s for r in records for s in (r.get("sites") or {})})
    for site in sites:
        pts = [(r["round"], r["sites"][site].get("epsilon")) for r in records if site in (r.get("sites") or {})]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot(*zip(*pts), "-o", label=site)
    target = next((r.get("target_epsilon") for r in records if r.get("target_epsilon")), None)
    if target:
        ax.axhline(target, linestyle=":", color="grey", label=f"target {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.set_title("privacy spent per site")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if sites or target:
        ax.legend(fontsize=8)
    fig.tight_layout()
    eps = folder / "epsilon.png"
    fig.savefig(eps, dpi=110)
    plt.close(fig)
    return [central, eps]
