"""Utility on real data: what DP and federation cost in accuracy. SST-2 (a per-site sample of
the GLUE training rows, Dirichlet split over labels; the GLUE validation set is the
coordinator's evaluation set) and AG News (split by label, each site mostly two topics; a sample
of the official test set for evaluation), 4 and 8 sites, epsilon 8 and 2, LoRA and FFA-LoRA,
against centralized non-private LoRA and centralized DP LoRA of the same model trained on the
same rows (the union of the sites' rows) for the same number of passes.

    python -m simulations.bench.utility [--size tiny|default|full]

Needs ../shared/data (see its README); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .common import RESULTS, SHARED_DATA, SIZES, config, federated_run, log, model_name, table, write_json

DATASETS = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/validation.tsv", "text": "sentence",
             "partition": ["federation.partition=dirichlet", "federation.alpha=1.0"]},
    "agnews": {"train": "agnews/train.tsv", "eval": "agnews/test.tsv", "text": "text",
               "partition": ["federation.partition=pathological", "federation.labels_per_site=2"]},
}


@dataclass(frozen=True)
class Grid:
    runs: list[tuple[str, int, float, bool]]   # dataset, sites, epsilon, FFA-LoRA
    rows_per_site: int
    eval_rows: dict[str, int]                   # per dataset; 0: the whole evaluation file
    rounds: int
    local_epochs: int


def _grid(size: str) -> Grid:
    if size == "tiny":
        return Grid([("sst2", 3, 8.0, False)], rows_per_site=40, eval_rows={"sst2": 60}, rounds=2, local_epochs=1)
    if size == "default":  # about 17 minutes on 2 CPU cores (DP MiniLM trains ~10-15 examples/s there)
        runs = [("sst2", 4, 8.0, False), ("sst2", 4, 8.0, True), ("sst2", 4, 2.0, False), ("agnews", 4, 8.0, False)]
        return Grid(runs, rows_per_site=100, eval_rows={"sst2": 0, "agnews": 500},
                    rounds=3, local_epochs=1)
    runs = [(d, s, e, f) for d in DATASETS for s in (4, 8) for e in (8.0, 2.0) for f in (False, True)]
    return Grid(runs, rows_per_site=2000, eval_rows={"sst2": 0, "agnews": 0}, rounds=5, local_epochs=2)


def _read(path: Path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, dtype=str)


def _write_sample(frame, path: Path) -> Path:
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def _data_files(dataset: str, sites: int, grid: Grid, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The training rows the sites hold (a seeded sample) and the coordinator's evaluation rows."""
    spec = DATASETS[dataset]
    train = _read(SHARED_DATA / spec["train"]).sample(n=sites * grid.rows_per_site, random_state=seed)
    train_path = _write_sample(train, work / f"{dataset}-{sites}-train.jsonl")
    evaluation = _read(SHARED_DATA / spec["eval"])
    if 0 < grid.eval_rows[dataset] < len(evaluation):  # the GLUE validation set is used whole
        evaluation = evaluation.sample(n=grid.eval_rows[dataset], random_state=seed)
    return train_path, _write_sample(evaluation, work / f"{dataset}-eval.jsonl")


def _common(model: str, dataset: str, train: Path, evaluation: Path, size: str) -> list[str]:
    return [f'model.name="{model}"', "model.max_length=64", "lora.r=8", "lora.alpha=16",
            f'data.train="{train}"', f'data.eval="{evaluation}"', f"data.text_column={DATASETS[dataset]['text']}",
            "data.label_column=label", "train.batch_size=64", "train.learning_rate=1e-2", "train.warmup_ratio=0.1",
            "privacy.target_delta=1e-5", "privacy.accountant=prv"]


def _federated(model, dataset, sites, epsilon, ffa, train, evaluation, grid, work, size) -> dict:
    sets = _common(model, dataset, train, evaluation, size) + DATASETS[dataset]["partition"] + [
        f"lora.freeze_a={'true' if ffa else 'false'}", f"train.epochs={grid.local_epochs}",
        "privacy.enabled=true", f"privacy.target_epsilon={epsilon}",
        f"federation.sites={sites}", f"federation.rounds={grid.rounds}", "federation.site_test_fraction=0",
        f"federation.fraction_evaluate={1 / sites}", "federation.secure_aggregation=true",
    ]
    name = f"{dataset} {sites} sites eps {epsilon:g} {'FFA-LoRA' if ffa else 'LoRA'}"
    log(f"utility: federated {name}")
    out = work / name.replace(" ", "-")
    records = federated_run(config(model, sets), out)
    privacy = json.loads((out / "privacy.json").read_text())
    return {"name": name, "kind": "federated", "dataset": dataset, "sites": sites, "epsilon_target": epsilon,
            "ffa": ffa, "rounds": [{"round": r["round"], "accuracy": r["central"]["accuracy"], "f1": r["central"]["f1"]}
                                   for r in records],
            "epsilon_spent": max(s["epsilon"] for s in privacy["sites"].values()),
            "accuracy": records[-1]["central"]["accuracy"], "f1": records[-1]["central"]["f1"],
            "seconds": sum(r["seconds"] for r in records)}


def _centralized(model, dataset, sites, dp, train, evaluation, grid, work, size) -> dict:
    from fedtune.local import run_train_local

    sets = _common(model, dataset, train, evaluation, size) + [
        f"train.epochs={grid.rounds * grid.local_epochs}",  # the same passes over the data as the federation
        f"privacy.enabled={'true' if dp else 'false'}", "privacy.target_epsilon=8.0"]
    name = f"{dataset} centralized {'DP eps 8' if dp else 'non-private'}"
    log(f"utility: {name} ({sites * grid.rows_per_site} rows)")
    metrics = run_train_local(config(model, sets), work / name.replace(" ", "-"))
    return {"name": name, "kind": "centralized", "dataset": dataset, "dp": dp, "rows": sites * grid.rows_per_site,
            "accuracy": metrics["eval"]["accuracy"], "f1": metrics["eval"]["f1"],
            "epsilon_spent": metrics["privacy"]["epsilon"] if metrics["privacy"] else None,
            "seconds": metrics["seconds"]}


def _plot(results: list[dict], dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("accuracy", "f1")):
        for r in results:
            if r["dataset"] != dataset:
                continue
            if r["kind"] == "federated":
                ax.plot([x["round"] for x in r["rounds"]], [x[metric] for x in r["rounds"]], marker="o",
                        label=r["name"])
            else:
                ax.axhline(r[metric], linestyle="--" if r["dp"] else "-", color="black" if not r["dp"] else "grey",
                           label=r["name"])
        ax.set_xlabel("round")
        ax.set_ylabel("macro-F1" if metric == "f1" else metric)
        ax.set_title(f"{dataset}: central {metric} by round")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"utility benchmark: {SHARED_DATA} is absent (real SST-2 / AG News data); skipped")
    grid = _grid(size)
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        baselines = sorted({(d, s) for d, s, _, _ in grid.runs})
        for dataset, sites in baselines:
            train, evaluation = _data_files(dataset, sites, grid, work)
            for dp in (False, True):
                results.append(_centralized(model, dataset, sites, dp, train, evaluation, grid, work, size))
            for d, s, epsilon, ffa in grid.runs:
                if (d, s) == (dataset, sites):
                    results.append(_federated(model, d, s, epsilon, ffa, train, evaluation, grid, work, size))
    rows = []
    for r in results:
        reference = next(c for c in results
                         if c["kind"] == "centralized" and not c["dp"] and c["dataset"] == r["dataset"])
        gap = 100 * (reference["accuracy"] - r["accuracy"])
        rows.append([r["name"], r["accuracy"], r["f1"], r["epsilon_spent"], gap, r["seconds"]])
    text = table(["run", "accuracy", "macro-F1", "epsilon spent", "points below centralized non-private", "seconds"],
                 rows)
    plots = []
    for dataset in sorted({r["dataset"] for r in results}):
        path = out_dir / f"utility-{size}-{dataset}.png"
        _plot(results, dataset, path)
        plots.append(path.name)
    print(f"\nUtility ({grid.rounds} rounds x {grid.local_epochs} local epochs, {grid.rows_per_site} rows per site)"
          f"\n{text}\nplots: {', '.join(plots)}")
    payload = {"grid": {"rows_per_site": grid.rows_per_site, "eval_rows": grid.eval_rows, "rounds": grid.rounds,
                        "local_epochs": grid.local_epochs}, "results": results, "plots": plots, "table": text}
    write_json("utility", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: simulations/results)")
    args = p.parse_args(argv)
    run(args.size, args.out)


if __name__ == "__main__":
    main()
