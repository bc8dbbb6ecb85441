"""Row partitioning across sites, run plots and the end-of-run summary table."""

import numpy as np
import pandas as pd
import pytest

from fedtune.federation.partition import partition_rows
from fedtune.federation.plots import write_plots
from fedtune.federation.summary import format_summary

NEWS = ["World", "Sports", "Business", "Sci/Tech"]


def _rows(n: int = 240, labels=NEWS, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Sorted by label on purpose: an unshuffled contiguous split would not be iid.
    label = np.sort(rng.choice(labels, n))
    return pd.DataFrame({"text": [f"row {i}" for i in range(n)], "label": label, "_row": np.arange(2, n + 2)})


def _check_disjoint_cover(df: pd.DataFrame, parts: list[pd.DataFrame]) -> None:
    assert sum(len(p) for p in parts) == len(df)
    seen = np.concatenate([p["_row"].to_numpy() for p in parts])
    assert len(set(seen)) == len(seen) == len(df)
    assert all(list(p.columns) == ["text", "label", "_row"] for p in parts)


@pytest.mark.parametrize("labels", [NEWS, ["0", "1"]])
@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
def test_partition_covers_every_row_once(method, labels):
    df = _rows(labels=labels)
    parts = partition_rows(df, 4, method, alpha=0.5, labels_per_site=1 if len(labels) == 2 else 2)
    assert len(parts) == 4 and all(len(p) > 0 for p in parts)
    _check_disjoint_cover(df, parts)


def test_iid_is_balanced_and_shuffled():
    df = _rows(242)
    parts = partition_rows(df, 5, "iid", seed=3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # Input is sorted by label, yet every site sees every label.
    assert all(set(p["label"]) == set(NEWS) for p in parts)
    assert [p["_row"].tolist() for p in parts] == [p["_row"].tolist() for p in partition_rows(df, 5, "iid", seed=3)]


def test_dirichlet_deterministic_per_seed():
    df = _rows()
    a = [p["_row"].tolist() for p in partition_rows(df, 4, "dirichlet", alpha=0.3, seed=1)]
    b = [p["_row"].tolist() for p in partition_rows(df, 4, "dirichlet", alpha=0.3, seed=1)]
    c = [p["_row"].tolist() for p in partition_rows(df, 4, "dirichlet", alpha=0.3, seed=2)]
    assert a == b
    assert a != c


def test_dirichlet_small_dataset_still_splits():
    df = _rows(30, labels=["0", "1"])
    parts = partition_rows(df, 3, "dirichlet", alpha=0.5)
    _check_disjoint_cover(df, parts)


@pytest.mark.parametrize("sites,per_site", [(4, 2), (3, 2), (6, 1), (2, 4)])
def test_pathological_label_limits(sites, per_site):
    df = _rows()
    parts = partition_rows(df, sites, "pathological", labels_per_site=per_site)
    _check_disjoint_cover(df, parts)
    assert all(p["label"].nunique() <= per_site for p in parts)
    assert set().union(*(set(p["label"]) for p in parts)) == set(NEWS)


def test_partition_errors():
    df = _rows(40)
    with pytest.raises(ValueError, match="iid, dirichlet, pathological"):
        partition_rows(df, 2, "shards")
    with pytest.raises(ValueError, match="50 sites but only 40 rows.*fewer sites"):
        partition_rows(df, 50, "iid")
    with pytest.raises(ValueError, match="labels_per_site = 5.*4 distinct labels"):
        partition_rows(df, 2, "pathological", labels_per_site=5)
    with pytest.raises(ValueError, match="cannot cover all 4 labels"):
        partition_rows(df, 2, "pathological", labels_per_site=1)
    with pytest.raises(ValueError, match=r"'dirichlet' left site-\d+ with no rows.*larger alpha"):
        partition_rows(df, 8, "dirichlet", alpha=0.01)
    with pytest.raises(ValueError, match="no 'target' column"):
        partition_rows(df, 2, "dirichlet", label_column="target")


def _classification_records() -> list[dict]:
    up, down = {"site-0": 1201674, "site-1": 1201674}, {"site-0": 903798, "site-1": 903798}
    return [
        {"round": 0, "central": {"loss": 1.38, "accuracy": 0.25, "f1": 0.1}, "federated": None, "sites": {},
         "bytes_up": {}, "bytes_down": {}, "seconds": 3.1, "target_epsilon": 8.0},
        {"round": 1, "central": {"loss": 1.2, "accuracy": 0.5, "f1": 0.4},
         "federated": {"loss": 1.25, "accuracy": 0.48, "f1": 0.41},
         "sites": {"site-0": {"examples": 300, "train_loss": 1.3, "epsilon": 4.1},
                   "site-1": {"examples": 250, "train_loss": 1.31, "epsilon": 4.4}},
         "bytes_up": up, "bytes_down": down, "seconds": 40.2, "target_epsilon": 8.0},
        # site-1 not sampled this round; no central evaluation either.
        {"round": 2, "central": None, "federated": {"loss": 1.1, "accuracy": 0.55, "f1": 0.5},
         "sites": {"site-0": {"examples": 300, "train_loss": 1.1, "epsilon": 5.9}},
         "bytes_up": {"site-0": 1201674}, "bytes_down": {"site-0": 903798}, "seconds": 38.7, "target_epsilon": 8.0},
        {"round": 3, "central": {"loss": 0.9, "accuracy": 0.7123456, "f1": 0.66}, "federated": None,
         "sites": {"site-0": {"examples": 300, "train_loss": 0.95, "epsilon": 7.2},
                   "site-1": {"examples": 250, "train_loss": 0.97, "epsilon": 6.1}},
         "bytes_up": up, "bytes_down": down, "seconds": 41.0, "target_epsilon": 8.0},
    ]


def _causal_records() -> list[dict]:
    return [
        {"round": 0, "central": {"loss": 10.4, "perplexity": 32860.0}, "federated": None, "sites": {},
         "bytes_up": {}, "bytes_down": {}, "seconds": 2.0},
        {"round": 1, "central": {"loss": 4.1, "perplexity": 60.3}, "federated": {"loss": 4.3, "perplexity": 73.7},
         "sites": {f"site-{i}": {"examples": 50, "train_loss": 5.0} for i in range(12)},
         "bytes_up": {"site-0": 10}, "bytes_down": {"site-0": 20}, "seconds": 12.5},
    ]


def _assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes


# causal-lm is also the one-round case (round 0 evaluation + round 1), with sites lacking epsilon.
@pytest.mark.parametrize("records", [_classification_records(), _causal_records()], ids=["classification", "causal-lm"])
def test_write_plots(tmp_path, records):
    paths = write_plots(records, tmp_path / "plots")
    assert [p.name for p in paths] == ["central.png", "epsilon.png"]
    for path in paths:
        _assert_png(path)


def test_summary_classification():
    text = format_summary(_classification_records())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["round", "accuracy", "f1", "loss"]
    for rnd in range(4):
        assert any(line.split()[0] == str(rnd) for line in lines[2:-1])
    assert "0.7123" in text and "2.403" in text and "7.2" in text  # 4 significant digits, MB, max eps
    assert lines[-1] == "best round: 3 (central accuracy 0.7123)"
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned columns
    round2 = next(line for line in lines if line.split()[0] == "2")
    assert round2.split()[1:4] == ["-", "-", "-"]  # central None


def test_summary_causal_and_missing():
    text = format_summary(_causal_records())
    assert "perplexity" in text and "32860" in text
    assert text.splitlines()[-1] == "best round: 1 (central loss 4.1)"
    assert format_summary([{"round": 0}]).splitlines()[-1].startswith("best round: -")
    assert format_summary([]) == "no rounds recorded"
