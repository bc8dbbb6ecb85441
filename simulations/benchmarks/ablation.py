"""Which recipe choices matter for federated DP fine-tuning (issue 10's ablation).

One split and one budget (SST-2, 4 sites by a Dirichlet over labels, alpha 1.0, 2,000 rows per
site, epsilon 8, 3 rounds x 1 local epoch: the utility benchmark's default grid point), fedtune's
defaults (FFA-LoRA rank 4, FedAvgM with server learning rate 2, auto batch and learning rate),
then the previous defaults (LoRA rank 8 with A trained, FedAvg), then one change at a time: A
trained too, rank 8, plain FedAvg, FedAdam, half the learning rate, twice the expected batch,
two local epochs per round, clip 0.5 and server momentum 0.9. Every run is a real
`fedtune simulate` with SecAgg+ on the same rows, evaluated centrally on the whole SST-2 dev set
(872). Reports accuracy, macro-F1, epsilon per site, the difference to the defaults in points and wall time, and a plot of
accuracy per round. After `utility` (as `run_all` runs them), the defaults row is the utility
benchmark's own run at this grid point, not trained twice. The JSON, table and plot are rewritten
after every run, so a stopped ablation keeps the rows it finished.

    python -m simulations.benchmarks.ablation [--size tiny|default|full]

Differences of a point or so are within the run-to-run spread of DP noise (fresh secret seeds
per run): read the table for large effects only. Needs ../shared/data; without it the benchmark
reports itself skipped.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from simulations.benchmarks.common import (RESULTS, log, main_for, model_name, skipped_without_shared_data, table,
                                           write_json)
from simulations.benchmarks.plots import plot_utility
from simulations.benchmarks.utility import TRAIN, Grid, data_files, federated, grid

DATASET, EPSILON = "sst2", 8.0
# The recipe fedtune used before this ablation chose the present defaults.
PREVIOUS_DEFAULTS = ("lora.freeze_a=false", "lora.r=8", "lora.alpha=16", "federation.strategy=fedavg")
# (name, overrides): fedtune's defaults, the previous ones, then one change at a time against the
# defaults, in order of what the issue asks first (a stopped run keeps the rows it finished).
VARIANTS: list[tuple[str, tuple[str, ...]]] = [
    ("defaults", ()),
    ("previous defaults (LoRA r 8, A trained, FedAvg)", PREVIOUS_DEFAULTS),
    ("A trained too (no FFA-LoRA; server lr 1)", ("lora.freeze_a=false",)),
    ("LoRA rank 8", ("lora.r=8", "lora.alpha=16")),
    ("FedAvg (server lr 1)", ("federation.strategy=fedavg",)),
    ("FedAdam (server lr 1e-2)", ("federation.strategy=fedadam",)),
    ("learning rate 5e-3 (auto: 1e-2)", ("train.learning_rate=5e-3",)),
    ("expected batch 192 (auto: 96)", ("train.batch_size=192",)),
    ("2 local epochs per round", ("train.epochs=2",)),   # twice the training time
    ("clip 0.5", ("privacy.max_grad_norm=0.5",)),
    ("server momentum 0.9", ("federation.server_momentum=0.9",)),
]
TINY_VARIANTS = VARIANTS[:2]


def reusable_defaults(size: str, out_dir: Path, g: Grid) -> dict | None:
    """The utility benchmark's federated run at this grid point with fedtune's defaults, when
    `run_all` has just written it (same size, sites, rows, rounds, local epochs and settings):
    the ablation's first row without training it twice. The data sample is the same (seed 0)."""
    path = out_dir / f"utility-{size}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    same = {k: getattr(g, k) for k in ("sites", "rows_per_site", "rounds", "local_epochs")}
    if {k: saved.get("grid", {}).get(k) for k in same} != same or saved["grid"].get("train") != TRAIN:
        return None
    for r in saved.get("results", []):
        if (r["kind"], r["dataset"], r["epsilon_target"], r.get("variant", "")) == ("federated", DATASET, EPSILON, ""):
            return dict(r, variant="defaults", overrides=[], reused_from=path.name)
    return None


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    if (skipped := skipped_without_shared_data("ablation")) is not None:
        return skipped
    g = grid(size)
    variants = TINY_VARIANTS if size == "tiny" else VARIANTS
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    payload: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        train, evaluation = data_files(DATASET, g.sites, g, work)
        for variant, extra in variants:
            reused = reusable_defaults(size, out_dir, g) if not extra else None
            if reused:
                log(f"ablation: {variant}: reusing the utility benchmark's run ({reused['reused_from']})")
            results.append(reused or federated(model, DATASET, g.sites, EPSILON, train, evaluation, g, work,
                                               variant, extra))
            log(f"ablation: {variant}: accuracy {results[-1]['accuracy']:.4f}")
            payload = _report(size, out_dir, g, variants, results)  # after every run: nothing lost if stopped
    print(f"\nAblation ({DATASET}, {g.sites} sites x {g.rows_per_site} rows, epsilon {EPSILON:g}, "
          f"{g.rounds} rounds x {g.local_epochs} local epoch)\n{payload['table']}\nplot: {payload['plots'][0]}")
    return payload


def _report(size: str, out_dir: Path, g: Grid, variants, results: list[dict]) -> dict:
    base = results[0]
    rows = []
    for r in results:
        r["points_vs_defaults"] = 100 * (r["accuracy"] - base["accuracy"])
        eps = ", ".join(f"{e:.2f}" for e in r["epsilon_per_site"].values())
        rows.append([r["variant"], " ".join(r["overrides"]) or "-",
                     ", ".join(f"{x['accuracy']:.3f}" for x in r["rounds"]), r["accuracy"], r["f1"],
                     r["points_vs_defaults"], eps, r["seconds"]])
    text = table(["variant", "overrides", "accuracy by round (0 = before)", "accuracy", "macro-F1",
                  "points vs defaults", "epsilon (per site)", "seconds"], rows)
    plot = plot_utility([dict(r, name=r["variant"]) for r in results], DATASET,
                        out_dir / f"ablation-{size}-{DATASET}.png").name
    payload = {"grid": {"dataset": DATASET, "epsilon": EPSILON, "sites": g.sites, "rows_per_site": g.rows_per_site,
                        "rounds": g.rounds, "local_epochs": g.local_epochs, "train": TRAIN},
               "variants": [[v, list(e)] for v, e in variants], "complete": len(results) == len(variants),
               "results": results, "plots": [plot], "table": text}
    write_json("ablation", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
