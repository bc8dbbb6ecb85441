"""Small, imbalanced sites under DP (issue 28): does the model learn more than the majority class?

Real data made small and skewed: SST-2 (2 classes) and AG News (4 topics), 4 sites of 100, 150,
200 and 300 training rows, one class (SST-2: negative, AG News: World) at 60, 70, 80 and 70% of a
site's rows and the other classes even; the coordinator's 400 evaluation rows (all 872 SST-2 dev
rows would be balanced: these keep the sites' pooled mix, 72%). Epsilon 3 and 8 per site, SecAgg+,
5 rounds, fedtune's defaults otherwise (VARIANTS): with ``train.class_balance = "off"``, with the
defaults (class_balance "auto", which turns to "reweighted" on these rows, with the class prior
from the coordinator's evaluation rows), with ``"logit-adjusted"`` instead, and with the defaults
training the classification head only (``lora.head_only``); the tiny size runs the first two. On
the union of the same rows, in the same run: a centralized non-private LoRA run and a frozen-embedding probe
(logistic regression, balanced class weights, on the base model's mean-pooled sentence embeddings).
Reports accuracy and macro-F1 after the last round against the majority class's, how many classes
the model predicts, and a plot of macro-F1 per round per task. Targets (TARGET_F1_ABOVE_MAJORITY):
at epsilon 8, macro-F1 at least 0.10 above the majority class's and at least half of the way from
it to centralized non-private LoRA.

    python -m simulations.benchmarks.small_sites [--size tiny|default]

Needs ../shared/data; without it the benchmark reports itself skipped. DP noise comes from fresh
secret seeds in every run: differences of a few points are within the run-to-run spread.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from simulations.benchmarks.common import (RESULTS, SHARED_DATA, config, federated_run, log, main_for, model_name,
                                           skipped_without_shared_data, table, write_json)

TASKS = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/validation.tsv", "text": "sentence", "majority": "0"},
    "agnews": {"train": "agnews/train.tsv", "eval": "agnews/test.tsv", "text": "text", "majority": "World"},
}
TARGET_F1_ABOVE_MAJORITY = 0.10       # at epsilon 8, and half of the way to centralized non-private
# (name, overrides): plain cross-entropy, fedtune's defaults (class_balance "auto": reweighted on
# these skewed rows), the logit-adjusted loss instead, and the defaults training the classification
# head only (a DP linear probe).
VARIANTS: list[tuple[str, tuple[str, ...]]] = [
    ("class_balance off", ("train.class_balance=off",)),
    ("defaults", ()),
    ("logit-adjusted", ("train.class_balance=logit-adjusted",)),
    ("head only", ("lora.head_only=true",)),
]
# Centralized non-private: the LoRA the utility benchmark measured its non-private baseline with.
NON_PRIVATE = ["privacy.enabled=false", "lora.r=8", "lora.alpha=16", "lora.freeze_a=false",
               "train.class_balance=off"]


@dataclass(frozen=True)
class Grid:
    tasks: tuple[str, ...]
    epsilons: tuple[float, ...]
    site_rows: tuple[int, ...]
    site_majority: tuple[float, ...]    # each site's share of the majority class
    eval_rows: int
    rounds: int
    variants: int = len(VARIANTS)      # the first this many of VARIANTS


def grid(size: str) -> Grid:
    if size == "tiny":
        return Grid(("sst2",), (8.0,), site_rows=(30, 40, 50), site_majority=(0.6, 0.7, 0.8), eval_rows=60, rounds=1,
                    variants=2)
    return Grid(tuple(TASKS), (8.0, 3.0), site_rows=(100, 150, 200, 300), site_majority=(0.6, 0.7, 0.8, 0.7),
                eval_rows=400, rounds=5)


def _read(path: Path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, dtype=str)


def _skewed(frame, n: int, majority: str, share: float, seed: int):
    """``n`` rows of ``frame``: ``share`` of them labelled ``majority``, the rest spread evenly."""
    import pandas as pd

    others = sorted(set(frame["label"]) - {majority})
    counts = {majority: round(n * share)}
    rest = n - counts[majority]
    for i, label in enumerate(others):
        counts[label] = rest // len(others) + (1 if i < rest % len(others) else 0)
    parts = [frame[frame["label"] == label].sample(n=k, random_state=seed) for label, k in counts.items()]
    return pd.concat(parts).sample(frac=1.0, random_state=seed)


def data_files(task: str, g: Grid, work: Path, seed: int = 0) -> tuple[list[Path], Path, Path]:
    """Each site's file, the union of them (the centralized baselines) and the coordinator's rows."""
    import pandas as pd

    spec = TASKS[task]
    pool = _read(SHARED_DATA / spec["train"]).sample(frac=1.0, random_state=seed)
    files, parts = [], []
    for i, (n, share) in enumerate(zip(g.site_rows, g.site_majority)):
        part = _skewed(pool, n, spec["majority"], share, seed + i)
        pool = pool.drop(part.index)  # no row at two sites
        parts.append(part)
        files.append(work / f"{task}-site-{i}.jsonl")
        part.to_json(files[-1], orient="records", lines=True, force_ascii=False)
    union = pd.concat(parts)
    pooled = float((union["label"] == spec["majority"]).mean())
    held = _skewed(_read(SHARED_DATA / spec["eval"]), g.eval_rows, spec["majority"], pooled, seed)
    union_path, eval_path = work / f"{task}-union.jsonl", work / f"{task}-eval.jsonl"
    union.to_json(union_path, orient="records", lines=True, force_ascii=False)
    held.to_json(eval_path, orient="records", lines=True, force_ascii=False)
    return files, union_path, eval_path


def majority_scores(eval_path: Path, majority: str) -> dict:
    """Always answering the majority class: accuracy its share, macro-F1 its F1 over the classes."""
    import pandas as pd

    labels = pd.read_json(eval_path, lines=True, dtype=False)["label"].astype(str)
    share = float((labels == majority).mean())
    return {"accuracy": share, "f1": (2 * share / (1 + share)) / labels.nunique()}


def _data(task: str, eval_path: Path) -> list[str]:
    return [f'data.eval="{eval_path}"', f"data.text_column={TASKS[task]['text']}", "data.label_column=label",
            "model.max_length=64"]


def federated(model: str, task: str, epsilon: float, variant: str, overrides: tuple[str, ...], files: list[Path],
              eval_path: Path, g: Grid, work: Path) -> dict:
    from fedtune.config import load_config

    sets = _data(task, eval_path) + [
        "federation.partition=files", "federation.site_files=[" + ",".join(f'"{f}"' for f in files) + "]",
        f"federation.sites={len(files)}", f"federation.rounds={g.rounds}", "federation.site_test_fraction=0",
        "federation.fraction_evaluate=0.0", "federation.secure_aggregation=true",
        "privacy.enabled=true", f"privacy.target_epsilon={epsilon}", *overrides]
    name = f"{task} federated eps {epsilon:g} {variant}"
    log(f"small_sites: {name}")
    out = work / name.replace(" ", "-")
    records = federated_run(config(model, sets), out)
    privacy = json.loads((out / "privacy.json").read_text())
    last = records[-1]["central"]
    sent = load_config(out / "config.toml").train  # what the coordinator sent the sites
    return {"name": name, "kind": "federated", "task": task, "epsilon_target": epsilon, "variant": variant,
            "overrides": list(overrides), "class_balance_sent": sent.class_balance, "class_prior": sent.class_prior,
            "accuracy": last["accuracy"], "f1": last["f1"], "predicted_classes": last.get("predicted_classes"),
            "rounds": [{"round": r["round"], "accuracy": r["central"]["accuracy"], "f1": r["central"]["f1"]}
                       for r in records],
            "epsilon_per_site": {k: v["epsilon"] for k, v in privacy["sites"].items()},
            "seconds": sum(r["seconds"] for r in records)}


def centralized_non_private(model: str, task: str, union: Path, eval_path: Path, g: Grid, work: Path) -> dict:
    from fedtune.local import run_train_local

    sets = _data(task, eval_path) + [f'data.train="{union}"', f"train.epochs={g.rounds}"] + NON_PRIVATE
    name = f"{task} centralized non-private"
    log(f"small_sites: {name}")
    metrics = run_train_local(config(model, sets), work / name.replace(" ", "-"))["eval"]
    return {"name": name, "kind": "centralized", "task": task, "accuracy": metrics["accuracy"], "f1": metrics["f1"],
            "predicted_classes": metrics["predicted_classes"]}


def frozen_probe(model: str, task: str, union: Path, eval_path: Path) -> dict:
    """Logistic regression (balanced class weights) on the frozen base model's sentence embeddings:
    fedtune's own load path and masked mean pooling, the features its classification head reads."""
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from fedtune.model import load_base_model, load_tokenizer

    cfg = config(model, ["model.max_length=64"]).model
    tokenizer = load_tokenizer(cfg)
    net = load_base_model(cfg, tokenizer, {0: "a", 1: "b"}).eval()
    encoder = getattr(net, net.base_model_prefix)  # its pooler is fedtune's MaskedMeanPooler
    column = TASKS[task]["text"]

    def embed(file: Path):
        frame = pd.read_json(file, lines=True, dtype=False)
        texts = list(frame[column].astype(str))
        with torch.no_grad():
            out = [encoder(**tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=cfg.max_length,
                                       return_tensors="pt")).pooler_output.numpy() for i in range(0, len(texts), 64)]
        return np.concatenate(out), frame["label"].astype(str).to_numpy()

    x, y = embed(union)
    xe, ye = embed(eval_path)
    pred = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x, y).predict(xe)
    return {"name": f"{task} frozen-embedding probe", "kind": "probe", "task": task,
            "accuracy": float(accuracy_score(ye, pred)), "f1": float(f1_score(ye, pred, average="macro")),
            "predicted_classes": int(len(set(pred)))}


def _judge(results: list[dict], majority: dict) -> None:
    for r in results:
        if r["kind"] != "federated":
            continue
        base = majority[r["task"]]["f1"]
        central = next(c["f1"] for c in results if c["kind"] == "centralized" and c["task"] == r["task"])
        r["f1_above_majority"] = round(r["f1"] - base, 6) + 0.0  # + 0.0: no "-0"
        r["share_of_way_to_centralized"] = round((r["f1"] - base) / (central - base), 4) + 0.0 if central > base else None
        r["meets_target"] = (r["f1_above_majority"] >= TARGET_F1_ABOVE_MAJORITY
                             and (r["share_of_way_to_centralized"] or 0) >= 0.5) if r["epsilon_target"] == 8.0 else None


def _table(results: list[dict], majority: dict) -> str:
    rows = []
    for task, m in majority.items():
        rows.append([f"{task} majority class", m["accuracy"], m["f1"], 1, None, None, None])
        for r in (r for r in results if r["task"] == task):
            rows.append([r["name"], r["accuracy"], r["f1"], r.get("predicted_classes"), r.get("f1_above_majority"),
                         r.get("share_of_way_to_centralized"), r.get("meets_target")])
    return table(["run", "accuracy", "macro-F1", "classes predicted", "macro-F1 above majority",
                  "share of the way to central non-DP", "target met (eps 8)"], rows)


def run(size: str = "default", out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    if (skipped := skipped_without_shared_data("small_sites")) is not None:
        return skipped
    g = grid(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    majority: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        model = model_name(size, work)
        for task in g.tasks:
            files, union, eval_path = data_files(task, g, work)
            majority[task] = majority_scores(eval_path, TASKS[task]["majority"])
            results.append(frozen_probe(model, task, union, eval_path))
            results.append(centralized_non_private(model, task, union, eval_path, g, work))
            for epsilon in g.epsilons:
                for variant, overrides in VARIANTS[:g.variants]:
                    results.append(federated(model, task, epsilon, variant, overrides, files, eval_path, g, work))
                    payload = _write(size, g, results, majority, out_dir, started)  # a stopped run keeps its rows
    print(f"\nSmall, imbalanced sites ({len(g.site_rows)} sites of {', '.join(map(str, g.site_rows))} rows, "
          f"majority share {', '.join(f'{s:.0%}' for s in g.site_majority)}, {g.rounds} rounds)\n{payload['table']}\n"
          f"plots: {', '.join(payload['plots'])}")
    return payload


def _write(size: str, g: Grid, results: list[dict], majority: dict, out_dir: Path, started: float) -> dict:
    from simulations.benchmarks.plots import plot_small_sites

    _judge(results, majority)
    text = _table(results, majority)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    plots = [plot_small_sites(results, majority[t], t, out_dir / f"small_sites-{size}-{t}.png").name for t in tasks]
    payload = {"grid": {"tasks": g.tasks, "epsilons": g.epsilons, "site_rows": g.site_rows,
                        "site_majority": g.site_majority, "eval_rows": g.eval_rows, "rounds": g.rounds,
                        "variants": [v for v, _ in VARIANTS[:g.variants]]},
               "majority": majority, "results": results, "plots": plots, "table": text,
               "seconds": time.perf_counter() - started}
    write_json("small_sites", size, payload, out_dir)
    return payload


def main(argv=None) -> None:
    main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
