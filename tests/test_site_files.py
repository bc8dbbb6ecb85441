"""Custom column names with one file per site (partition = "files") and on a deployed coordinator."""

import pandas as pd
import pytest

from fedtune import tiny
from fedtune.config import load_config
from fedtune.data import DataError
from fedtune.federation.dataset import federated_rows
from fedtune.server.coordinator import coordinator_rows


def _write(rows, path):
    renamed = [{"review": r["text"], "sentiment": r["label"]} for r in rows]
    return tiny.write_csv(renamed, path)


@pytest.fixture
def review_files(tmp_path):
    files = [_write(tiny.separable_rows(30, seed=i), tmp_path / f"site{i}.csv") for i in range(3)]
    return files, _write(tiny.separable_rows(20, seed=9), tmp_path / "eval.csv")


def _cfg(files, held, extra=()):
    return load_config(None, [
        "federation.partition=files", "federation.site_files=[" + ",".join(f'"{f}"' for f in files) + "]",
        f'data.eval="{held}"', 'data.text_column="review"', 'data.label_column="sentiment"', *extra])


def test_files_partition_reads_the_configured_columns(review_files):
    files, held = review_files
    cfg = _cfg(files, held)
    assert cfg.federation.sites == 3  # follows site_files
    rows = federated_rows(cfg)
    assert rows.columns == ["review", "sentiment"]
    assert [len(s) for s in rows.sites] == [30, 30, 30]
    assert rows.label_map.labels == ["neg", "pos"]
    expected = pd.read_csv(files[1])["review"].tolist()
    assert rows.sites[1]["review"].tolist() == expected


def test_a_missing_configured_column_is_named(review_files):
    files, held = review_files
    with pytest.raises(DataError, match="site0.csv.*'text'|'text'.*site0.csv"):
        federated_rows(_cfg(files, held, ['data.text_column="text"']))


def test_a_deployed_coordinator_reads_its_eval_file_with_custom_columns(review_files):
    _, held = review_files
    cfg = load_config(None, [f'data.eval="{held}"', 'data.text_column="review"', 'data.label_column="sentiment"'])
    rows = coordinator_rows(cfg)
    assert rows.columns == ["review", "sentiment"] and len(rows.central) == 20
