"""The privacy audit in one run (`fedtune audit`): the lower bound on epsilon it measures, with
DP at several budgets and without DP, on the main job's run (`simulations/federated.toml`:
bundled all-MiniLM-L6-v2, FFA-LoRA rank 4, 3 sites, 3 rounds, SecAgg+), 1,000 canaries in site-0.

Each point is one real audited run: the same simulation as `fedtune simulate`, the canaries
joined to site-0's training rows, each with probability 1/2. Without DP the site's own
`allow_non_private` lets it train unprotected, at the DP recipe's learning rate (1e-2), and once
more with 3 local epochs (more memorisation): the audit must see that (a positive bound); with
DP the bound must stay at or below the accountant's epsilon. Reported: the bound
(the larger of Steinke et al.'s and the f-DP one), both bounds, canaries, guesses, right guesses,
the canaries' AUC (included against excluded scores), the accountant's epsilon and wall time.

    python -m simulations.benchmarks.audit [--size tiny|default|full]

Tiny mode (CI): a tiny random BERT (hidden size 128, to have room to memorise), 2 sites, few
rows, 12 local epochs at learning rate 5e-2, 200 canaries, without DP and at epsilon 1: the two claims the
tests check.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


from simulations.benchmarks.common import REPO, RESULTS, log, main_for, table, wait_for_ray_to_be_free, write_json

# Without DP: the site's own switch, and the learning rate the DP recipe uses (auto gives 1e-3
# without DP), so that only noise and clipping differ from the DP points.
NO_DP = ("privacy.enabled=false", 'federation.site_privacy={"*"={allow_non_private=true}}')
POINTS = {  # (name, overrides) per size
    # 60 local epochs at epsilon 1 need noise above 20: the simulated sites allow up to 50 (their own
    # setting; the default maximum is 20).
    "tiny": [("no DP", NO_DP),
             ("epsilon 1", ("privacy.target_epsilon=1", 'federation.site_privacy={"*"={max_noise_multiplier=50}}'))],
    "default": [("no DP", (*NO_DP, "train.learning_rate=1e-2")),
                ("no DP, 3 local epochs", (*NO_DP, "train.learning_rate=1e-2", "train.epochs=3")),
                ("epsilon 8", ()), ("epsilon 4", ("privacy.target_epsilon=4",)),
                ("epsilon 1", ("privacy.target_epsilon=1",))],
}
POINTS["full"] = POINTS["default"]
CANARIES = {"tiny": 200, "default": 1000, "full": 1000}


def _config(size: str, work: Path, sets):
    from fedtune.config import load_config

    if size != "tiny":
        return load_config(REPO / "simulations" / "federated.toml", ["train.progress=false", *sets])
    from fedtune import tiny

    folder = work / "tiny-bert-128"
    if not (folder / "config.json").exists():
        tiny.make_tiny_bert(folder, hidden_size=128)
    return load_config(None, [
        f'model.name="{folder}"', "data.builtin=demo", "data.builtin_rows=60", "model.max_length=24",
        "federation.sites=2", "federation.rounds=5", "train.epochs=12", "train.learning_rate=5e-2",
        "train.progress=false", *sets])


def _auc(path: Path) -> float:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    d = pd.read_csv(path)
    return float(roc_auc_score(d["included"], d["score"]))


def plot(folders: dict[str, Path], results: list[dict], path: Path) -> Path:
    """One panel per run: the canaries' scores, included against excluded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from fedtune.audit.run import draw_scores

    fig, axes = plt.subplots(1, len(folders), figsize=(4 * len(folders), 3.4), squeeze=False)
    for ax, (name, folder), res in zip(axes[0], folders.items(), results):
        d = pd.read_csv(folder / "canaries.csv")
        draw_scores(ax, d["score"].to_numpy(), d["included"].to_numpy())
        ax.set_title(f"{name}: bound {res['epsilon_lower_bound']:.2f}, AUC {res['auc']:.2f}", fontsize=9)
        ax.set_xlabel("loss decrease (centred per label)")
    axes[0][0].set_ylabel("canaries")
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    from fedtune.audit.run import run_audit

    results, rows, folders = [], [], {}
    out = Path(out_dir) if out_dir is not None else RESULTS
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        for name, sets in POINTS[size]:
            log(f"audit: {name}, {CANARIES[size]} canaries")
            wait_for_ray_to_be_free()
            start = time.perf_counter()
            folders[name] = work / name.replace(" ", "-").replace(",", "")
            res = run_audit(_config(size, work, sets), folders[name], CANARIES[size])
            seconds = time.perf_counter() - start
            auc = _auc(folders[name] / "canaries.csv")
            results.append({"point": name, **res.model_dump(), "auc": auc, "seconds": seconds})
            rows.append([name, res.epsilon, res.epsilon_lower_bound, res.epsilon_lower_bound_steinke,
                         res.epsilon_lower_bound_fdp, res.canaries, res.guesses, res.correct, auc,
                         res.violated, seconds])
        figure = plot(folders, results, out / f"audit-{size}.png")
    text = table(["run", "accountant eps", "lower bound", "Steinke", "f-DP", "canaries", "guesses", "right",
                  "AUC", "bound > eps", "s"], rows)
    print(f"\nPrivacy audit in one run (99% confidence, delta 1e-5)\n{text}")
    payload = {"results": results, "table": text,
               "violations": [r["point"] for r in results if r["violated"]],
               "lower_bounds": {r["point"]: r["epsilon_lower_bound"] for r in results}, "plot": figure.name}
    write_json("audit", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
