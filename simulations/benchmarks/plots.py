"""Per-round accuracy and macro-F1 curves of the utility benchmark (matplotlib PNG)."""

from __future__ import annotations

from pathlib import Path


def plot_utility(results: list[dict], dataset: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("accuracy", "f1")):
        for r in (r for r in results if r["dataset"] == dataset):
            if r["kind"] == "federated":
                ax.plot([x["round"] for x in r["rounds"]], [x[metric] for x in r["rounds"]], marker="o",
                        label=r["name"])
            else:  # centralized: one final number, drawn as a reference line
                ax.axhline(r[metric], linestyle="--" if r["dp"] else "-", color="grey" if r["dp"] else "black",
                           label=r["name"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel("macro-F1" if metric == "f1" else metric)
        ax.set_title(f"{dataset}: coordinator's evaluation, {'macro-F1' if metric == 'f1' else metric}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
