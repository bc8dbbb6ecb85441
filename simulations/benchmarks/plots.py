"""The benchmarks' plots (matplotlib PNG): utility curves, deployed round time per site count."""

from __future__ import annotations

from pathlib import Path


def plot_accuracy_vs_epsilon(results: list[dict], path: Path) -> Path:
    """Final central accuracy against the per-site epsilon: federated per split, centralized DP
    per data file, centralized non-private as a dashed line at the right edge's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r["kind"] == "federated":
            if not r.get("variant"):  # variants (e.g. with federated evaluation): not a point of the curve
                groups.setdefault(f"{r['dataset']} federated", []).append((r["epsilon_target"], r["accuracy"]))
        elif r["dp"]:
            groups.setdefault(f"{r['dataset']} centralized DP", []).append((r["epsilon_target"], r["accuracy"]))
    for label, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                linestyle="--" if "centralized" in label else "-")
    for r in results:
        if r["kind"] == "centralized" and not r["dp"]:
            ax.axhline(r["accuracy"], color="black", linewidth=0.8, label=f"{r['dataset']} centralized non-private")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon per site (delta 1e-5)")
    ax.set_ylabel("central accuracy after the last round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_utility(results: list[dict], dataset: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("accuracy", "f1")):
        # Centralized baselines carry their data file's name ("agnews" for both AG News splits).
        for r in (r for r in results if r["dataset"] == dataset
                  or (r["kind"] == "centralized" and dataset.startswith(r["dataset"]))):
            if r["kind"] == "federated":
                line, = ax.plot([x["round"] for x in r["rounds"]], [x[metric] for x in r["rounds"]], marker="o",
                                label=r["name"])
                fed = [(x["round"], x.get("federated_accuracy")) for x in r["rounds"]]
                fed = [(rnd, v) for rnd, v in fed if v is not None]
                if metric == "accuracy" and fed:  # the sites' noised answers, same run, same colour
                    ax.plot([p[0] for p in fed], [p[1] for p in fed], marker="x", linestyle=":",
                            color=line.get_color(), label=f"{r['name']}: federated (noised)")
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


def plot_round_time_vs_sites(results: list[dict], stages: list[str], path: Path) -> Path:
    """deploy_load: the mean round wall time per number of deployed sites, split into the
    coordinator's stages (stacked bars), with each round's own time as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    x = list(range(len(results)))
    bottom = [0.0] * len(results)
    for stage in stages:
        heights = [r["stage_seconds"].get(stage, 0.0) for r in results]
        ax.bar(x, heights, bottom=bottom, width=0.6, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, r in enumerate(results):
        ax.scatter([i] * len(r["round_seconds"]), r["round_seconds"], color="black", s=12, zorder=3,
                   label="one round (total)" if i == 0 else None)
        ax.annotate(f"x{r['ratio_vs_fewest']:.2f}", (i, max(r["round_seconds"])), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(x, [str(r["sites"]) for r in results])
    ax.set_xlabel("deployed sites on 127.0.0.1 (one machine)")
    ax.set_ylabel("round wall time (s)")
    ax.set_title("Round time per site count: TLS, DP-SGD, SecAgg+, tiny model", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_small_sites(results: list[dict], majority: dict, task: str, path: Path) -> Path:
    """small_sites: macro-F1 per round of each federated run of ``task``, with the majority class,
    the frozen-embedding probe and centralized non-private LoRA as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in (r for r in results if r["task"] == task):
        if r["kind"] == "federated":
            ax.plot([x["round"] for x in r["rounds"]], [x["f1"] for x in r["rounds"]], marker="o",
                    linestyle=":" if r["class_balance_sent"] == "off" else "-",
                    label=f"federated eps {r['epsilon_target']:g}, {r['variant']}")
        else:
            ax.axhline(r["f1"], color="black" if r["kind"] == "centralized" else "grey",
                       linestyle="-" if r["kind"] == "centralized" else "--", label=r["name"])
    ax.axhline(majority["f1"], color="red", linestyle=":", label="always the majority class")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("macro-F1 (coordinator's evaluation rows)")
    ax.set_title(f"{task}: small, imbalanced sites", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
