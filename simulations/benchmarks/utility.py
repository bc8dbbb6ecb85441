"""Utility on real data: what DP and federation cost in accuracy. SST-2 (a sample of the GLUE
training rows, Dirichlet split over labels; the GLUE validation set is the coordinator's
evaluation set) and AG News (split by label, each site two of the four topics; the official test
set, or a sample of it, for evaluation); 4 and 8 sites, epsilon 8 and 2, LoRA and FFA-LoRA;
against centralized non-private LoRA and centralized DP LoRA (epsilon 8) of the same model on the
same rows (the union of the sites' rows), for the same number of passes over them.
Target: federated DP at epsilon 8 within 2 points of centralized non-private.

    python -m simulations.benchmarks.utility [--size tiny|default|full]

Needs ../shared/data (see its README); without it the benchmark reports itself skipped.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from simulations.benchmarks.common import (RESULTS, SHARED_DATA, config, federated_run, log, main_for, table,
                                           write_json, model_name)
from simulations.benchmarks.plots import plot_utility

DATASETS = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/validation.tsv", "text": "sentence",
             "partition": ["federation.partition=dirichlet", "federation.alpha=1.0"]},
    "agnews": {"train": "agnews/train.tsv", "eval": "agnews/test.tsv", "text": "text",
               "partition": ["federation.partition=pathological", "federation.labels_per_site=2"]},
}
TARGET_POINTS = 2.0

# Training settings shared by every run. DP-SGD wants large batches and a high learning rate
# (fedtune's defaults: batch 64, lr 1e-2); the non-private baseline uses the same so that the
# comparison changes one thing at a time.
TRAIN = ["model.max_length=64", "lora.r=8", "lora.alpha=16", "train.batch_size=64", "train.learning_rate=1e-2",
         "train.warmup_ratio=0.1", "privacy.target_delta=1e-5", "privacy.accountant=prv"]


@dataclass(frozen=True)
class Grid:
    runs: list[tuple[str, int, float, bool]]   # dataset, sites, epsilon, FFA-LoRA
    rows_per_site: int
    eval_rows: dict                             # dataset -> rows sampled (0: the whole file)
    rounds: int
    local_epochs: int


def grid(size: str) -> Grid:
    if size == "tiny":
        return Grid([("sst2", 3, 8.0, False)], rows_per_site=40, eval_rows={"sst2": 60}, rounds=2, local_epochs=1)
    if size == "default":  # a subset (both datasets, 4 sites, eps 8, LoRA): about 18 minutes on 2 CPU cores
        runs = [("sst2", 4, 8.0, False), ("agnews", 4, 8.0, False)]
        return Grid(runs, rows_per_site=150, eval_rows={"sst2": 0, "agnews": 760}, rounds=3, local_epochs=2)
    runs = [(d, s, e, f) for d in DATASETS for s in (4, 8) for e in (8.0, 2.0) for f in (False, True)]
    return Grid(runs, rows_per_site=1000, eval_rows={"sst2": 0, "agnews": 0}, rounds=5, local_epochs=2)


def _read(path: Path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, dtype=str)


def data_files(dataset: str, sites: int, g: Grid, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """A seeded sample of training rows (what the sites hold between them) and the evaluation
    rows, written to the work folder (never into the repository)."""
    spec = DATASETS[dataset]
    train = _read(SHARED_DATA / spec["train"]).sample(n=sites * g.rows_per_site, random_state=seed)
    evaluation = _read(SHARED_DATA / spec["eval"])
    if g.eval_rows.get(dataset) and g.eval_rows[dataset] < len(evaluation):
        evaluation = evaluation.sample(n=g.eval_rows[dataset], random_state=seed)
    train_path, eval_path = work / f"{dataset}-{sites}-train.jsonl", work / f"{dataset}-eval.jsonl"
    train.to_json(train_path, orient="records", lines=True, force_ascii=False)
    evaluation.to_json(eval_path, orient="records", lines=True, force_ascii=False)
    return train_path, eval_path


def _data_sets(dataset: str, train: Path, evaluation: Path) -> list[str]:
    return [f'data.train="{train}"', f'data.eval="{evaluation}"', f"data.text_column={DATASETS[dataset]['text']}",
            "data.label_column=label"]


def federated(model, dataset, sites, epsilon, ffa, train, evaluation, g: Grid, work: Path) -> dict:
    sets = TRAIN + _data_sets(dataset, train, evaluation) + DATASETS[dataset]["partition"] + [
        f"lora.freeze_a={'true' if ffa else 'false'}", f"train.epochs={g.local_epochs}",
        "privacy.enabled=true", f"privacy.target_epsilon={epsilon}",
        f"federation.sites={sites}", f"federation.rounds={g.rounds}", "federation.site_test_fraction=0",
        f"federation.fraction_evaluate={1 / sites}", "federation.secure_aggregation=true",
    ]
    name = f"{dataset} federated {sites} sites eps {epsilon:g} {'FFA-LoRA' if ffa else 'LoRA'}"
    log(f"utility: {name}")
    out = work / name.replace(" ", "-")
    records = federated_run(config(model, sets), out)
    privacy = json.loads((out / "privacy.json").read_text())
    return {"name": name, "kind": "federated", "dataset": dataset, "sites": sites, "epsilon_target": epsilon,
            "ffa": ffa, "rows": sites * g.rows_per_site,
            "rounds": [{"round": r["round"], "accuracy": r["central"]["accuracy"], "f1": r["central"]["f1"]}
                       for r in records],
            "epsilon_spent": max(s["epsilon"] for s in privacy["sites"].values()),
            "accuracy": records[-1]["central"]["accuracy"], "f1": records[-1]["central"]["f1"],
            "seconds": sum(r["seconds"] for r in records)}


def centralized(model, dataset, sites, dp, train, evaluation, g: Grid, work: Path) -> dict:
    from fedtune.local import run_train_local

    sets = TRAIN + _data_sets(dataset, train, evaluation) + [
        f"train.epochs={g.rounds * g.local_epochs}",  # the same passes over the rows as the federation
        f"privacy.enabled={'true' if dp else 'false'}", "privacy.target_epsilon=8.0"]
    name = f"{dataset} centralized {'DP eps 8' if dp else 'non-private'}"
    log(f"utility: {name} ({sites * g.rows_per_site} rows, {g.rounds * g.local_epochs} epochs)")
    metrics = run_train_local(config(model, sets), work / name.replace(" ", "-"))
    return {"name": name, "kind": "centralized", "dataset": dataset, "dp": dp, "rows": sites * g.rows_per_site,
            "accuracy": metrics["eval"]["accuracy"], "f1": metrics["eval"]["f1"],
            "epsilon_spent": metrics["privacy"]["epsilon"] if metrics["privacy"] else None,
            "seconds": metrics["seconds"]}


def _table(results: list[dict]) -> str:
    rows = []
    for r in results:
        ref = next(c for c in results if c["kind"] == "centralized" and not c["dp"] and c["dataset"] == r["dataset"]
                   and c["rows"] == r["rows"])
        gap = 100 * (ref["accuracy"] - r["accuracy"])
        eps8_fed = r["kind"] == "federated" and r["epsilon_target"] == 8.0
        r["points_below_centralized_non_private"] = gap
        r["meets_target"] = gap <= TARGET_POINTS if eps8_fed else None
        rows.append([r["name"], r["rows"], r["accuracy"], r["f1"], r["epsilon_spent"], gap, r["meets_target"],
                     r["seconds"]])
    return table(["run", "train rows", "accuracy", "macro-F1", "epsilon spent", "points below central non-DP",
                  f"eps 8 within {TARGET_POINTS:g}", "seconds"], rows)


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    if not SHARED_DATA.is_dir():
        reason = f"{SHARED_DATA} is absent (real SST-2 / AG News data, see its README): utility benchmark skipped"
        log(reason)
        return {"skipped": reason, "table": reason}
    g = grid(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        for dataset, sites in sorted({(d, s) for d, s, _, _ in g.runs}):
            train, evaluation = data_files(dataset, sites, g, work)
            for dp in (False, True):
                results.append(centralized(model, dataset, sites, dp, train, evaluation, g, work))
            for d, s, epsilon, ffa in g.runs:
                if (d, s) == (dataset, sites):
                    results.append(federated(model, d, s, epsilon, ffa, train, evaluation, g, work))
    text = _table(results)
    plots = [plot_utility(results, d, out_dir / f"utility-{size}-{d}.png").name
             for d in sorted({r["dataset"] for r in results})]
    print(f"\nUtility ({g.rounds} rounds x {g.local_epochs} local epochs, {g.rows_per_site} rows per site)"
          f"\n{text}\nplots: {', '.join(plots)}")
    payload = {"grid": {"runs": g.runs, "rows_per_site": g.rows_per_site, "eval_rows": g.eval_rows,
                        "rounds": g.rounds, "local_epochs": g.local_epochs, "train": TRAIN},
               "target_points": TARGET_POINTS, "results": results, "plots": plots, "table": text}
    write_json("utility", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
