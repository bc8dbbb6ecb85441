"""The unit of privacy: at most k rows per unit, a secret random subset; duplicate reports; the
site's local test split. Membership by keyed hash: one row (unit) more or less moves no other."""

import math

import pandas as pd
import pytest

from fedtune.data.errors import DataError
from fedtune.data.membership import split_rows
from fedtune.data.units import bound_units, duplicate_report
from fedtune.privacy.group import group_privacy


KEY, COLS = b"k" * 32, ["text", "label"]


def _frame(units: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"row {i}" for i in range(len(units))], "label": "pos", "patient": units})


@pytest.mark.parametrize("units, k, kept, bounded, largest", [
    (["a", "b", "c"], 1, 3, 0, 1),                       # one row per unit: nothing to cut
    (["a", "a", "a", "b"], 1, 2, 1, 3),
    (["a", "a", "a", "b", "b"], 2, 4, 1, 3),
    (["a"] * 10 + ["b"] * 2 + ["c"], 3, 6, 1, 10),
    (["x"] * 5, 5, 5, 0, 5),
])
def test_bound_units_keeps_at_most_k_rows_per_unit(units, k, kept, bounded, largest):
    df = _frame(units)
    out, report = bound_units(df, "patient", k, KEY, COLS)
    assert len(out) == kept == report.rows_kept
    assert out["patient"].value_counts().max() <= k
    assert (report.units, report.units_bounded, report.largest_unit) == (len(set(units)), bounded, largest)
    assert list(out.index) == sorted(out.index)  # original order kept
    # Units with at most k rows keep every row.
    small = [u for u in set(units) if units.count(u) <= k]
    assert all((out["patient"] == u).sum() == units.count(u) for u in small)


def test_the_subset_depends_on_the_site_secret_and_is_stable():
    df = _frame(["a"] * 40)
    first, _ = bound_units(df, "patient", 3, KEY, COLS)
    again, _ = bound_units(df, "patient", 3, KEY, COLS)
    assert list(first.index) == list(again.index)  # the same rows every run on this data
    others = {tuple(bound_units(df, "patient", 3, bytes([i]) * 32, COLS)[0].index) for i in range(8)}
    assert len(others) > 1  # another key, another subset: not predictable without the key
    as_other = bound_units(df.rename(columns={"patient": "other"}), "other", 3, KEY, COLS)[0]
    assert list(as_other.index) != list(first.index)  # each unit column its own stream


def test_adding_a_person_or_a_row_changes_no_other_persons_kept_rows():
    """Neighbouring files (one unit, or one row of one unit, more): every other unit keeps
    exactly the same rows, so the group-privacy epsilon for k rows per unit holds."""
    people = [f"p{i}" for i in range(100) for _ in range(1 + i % 5)]
    df = _frame(people)
    kept, _ = bound_units(df, "patient", 2, KEY, COLS)
    newcomer = pd.DataFrame({"text": [f"new row {j}" for j in range(4)], "label": "pos", "patient": "p-new"})
    bigger = pd.concat([newcomer, df])  # at the top: every other row's position moves
    kept_bigger, _ = bound_units(bigger, "patient", 2, KEY, COLS)
    assert _rows(kept_bigger[kept_bigger["patient"] != "p-new"]) == _rows(kept)
    one_more = pd.concat([df, pd.DataFrame({"text": ["one more"], "label": "pos", "patient": "p7"})])
    kept_more, _ = bound_units(one_more, "patient", 2, KEY, COLS)
    assert _rows(kept_more[kept_more["patient"] != "p7"]) == _rows(kept[kept["patient"] != "p7"])


def test_removing_a_row_moves_no_other_row_across_the_local_test_split():
    df = pd.DataFrame({"text": [f"note {i}" for i in range(1000)], "label": ["pos", "neg"] * 500})
    train, test = split_rows(df, COLS, 0.2, KEY)
    assert 150 < len(test) < 250  # each row with probability 0.2
    smaller_train, smaller_test = split_rows(df.drop(index=[17]), COLS, 0.2, KEY)
    assert _rows(smaller_train) | _rows(smaller_test) == (_rows(train) | _rows(test)) - _rows(df.loc[[17]])
    assert _rows(smaller_train) == _rows(train) - _rows(df.loc[[17]])
    assert _rows(smaller_test) == _rows(test) - _rows(df.loc[[17]])
    shuffled_train, _ = split_rows(df.sample(frac=1.0, random_state=3), COLS, 0.2, KEY)
    assert _rows(shuffled_train) == _rows(train)  # by content, not position
    other_key, _ = split_rows(df, COLS, 0.2, b"\x01" * 32)
    assert _rows(other_key) != _rows(train)  # the site's key decides: unpredictable without it


def _rows(df: pd.DataFrame) -> set[tuple]:
    return set(df[["text", "label"]].itertuples(index=False, name=None))


@pytest.mark.parametrize("units, error", [
    (["a", None, "b"], r"1 row\(s\) have no value"),
    (["a", "  ", "b"], r"1 row\(s\) have no value"),
])
def test_rows_without_a_unit_are_refused(units, error):
    with pytest.raises(DataError, match=error):
        bound_units(_frame(units), "patient", 1, KEY, COLS, source="site.csv")


def test_a_missing_unit_column_names_the_file():
    with pytest.raises(DataError, match="site.csv: no privacy-unit column 'pid'"):
        bound_units(_frame(["a"]), "pid", 1, KEY, COLS, source="site.csv")


@pytest.mark.parametrize("texts, exact, near", [
    (["a b", "c d", "e f"], 0, 0),
    (["a b", "a b", "c"], 1, 0),
    (["a b", "A  B", "a b "], 0, 2),                     # case and whitespace only
    (["Pain in chest", "pain in  chest", "Pain in chest", "other"], 1, 1),
    ([], 0, 0),
])
def test_duplicate_report(texts, exact, near):
    df = pd.DataFrame({"text": texts, "label": ["pos"] * len(texts)})
    report = duplicate_report(df, ["text", "label"])
    assert (report.exact, report.near, report.any) == (exact, near, bool(exact or near))


@pytest.mark.parametrize("eps, delta, k, expected", [
    (1.0, 1e-5, 1, (1.0, 1e-5)),
    (1.0, 1e-5, 2, (2.0, 2 * math.e * 1e-5)),
    (0.5, 1e-6, 4, (2.0, 4 * math.exp(1.5) * 1e-6)),
    (math.inf, 1e-5, 3, (math.inf, math.inf)),
    (800.0, 1e-5, 3, (2400.0, math.inf)),                # exp overflows: no guarantee, never capped
])
def test_group_privacy(eps, delta, k, expected):
    got = group_privacy(eps, delta, k)
    assert got[0] == pytest.approx(expected[0]) and got[1] == pytest.approx(expected[1])


def test_a_site_without_unit_column_reports_duplicates_before_training(tmp_path, caplog):
    from fedtune import tiny
    from fedtune.client.runtime import _site_rows, site_config
    from fedtune.client.settings import SiteSettings
    from fedtune.config import load_config

    rows = tiny.separable_rows(12, seed=1)
    rows += [dict(rows[0]), {"text": rows[1]["text"].upper() + "  ", "label": rows[1]["label"]}]
    data = tiny.write_csv(rows, tmp_path / "site.csv")
    settings = SiteSettings.model_validate({"site-id": "s", "data-path": str(data), "state-dir": str(tmp_path / "st")})
    toml = load_config(None, ['data.labels=["neg","pos"]']).to_toml()
    with caplog.at_level("WARNING", logger="fedtune.client.site"):
        kept, _, units = _site_rows(site_config(toml, settings), settings, toml, tmp_path / "st")
    assert units is None and len(kept) == 13  # the exact duplicate is dropped, the near one kept
    assert "1 exact and 1 near-duplicate rows" in caplog.text

    settings = settings.model_copy(update={"privacy_unit": "label", "max_rows_per_unit": 2})
    kept, _, units = _site_rows(site_config(toml, settings), settings, toml, tmp_path / "st")
    assert units.units == 2 and len(kept) == 4 and "label" in kept.columns  # label is both unit and column


def test_a_runs_delta_is_clamped_to_the_sites_and_the_sites_own_at_or_above_one_over_n_is_said(
        tmp_path, caplog, tiny_models):
    """The run's delta is a request: above the site's (its target-delta, else min(1e-5, 1/(10 N)))
    it is clamped, and said. Only the site's own setting can be too large; the site's policy
    refuses it (client/policy.py), and building the site says so at once in its log."""
    from fedtune import tiny
    from fedtune.client.runtime import _build
    from fedtune.client.settings import SiteSettings
    from helpers import tiny_config

    data = tiny.write_csv(tiny.separable_rows(100, seed=3), tmp_path / "site.csv")
    toml = tiny_config(tiny_models["bert"], overrides=["privacy.target_delta=0.01", 'data.labels=["neg","pos"]']).to_toml()
    site = SiteSettings.model_validate({"site-id": "s", "data-path": str(data), "state-dir": str(tmp_path / "st"),
                                        "test-fraction": 0.0})
    with caplog.at_level("INFO", logger="fedtune.client.site"):
        _build(toml, site, tmp_path / "st")  # 0.01 >= 1/100: asked by the run, clamped to the site's 1e-05
        assert "the run asks delta 0.01; this site's is 1e-05: clamped" in caplog.text and "1/N" not in caplog.text
        caplog.clear()
        _build(toml, site.model_copy(update={"target_delta": 0.01}), tmp_path / "st")  # the site's own: refused
        assert "delta 0.01 is at or above 1/N for this site's 100 rows" in caplog.text


def test_a_sites_split_is_its_own_and_one_row_more_moves_no_other_row(tmp_path, tiny_models):
    """Built as a deployed site builds itself each round (client/runtime.py): the coordinator's
    train.seed and site_test_fraction do not move the split, and the file with one row more
    trains on the same other rows and tests on the same other rows."""
    from fedtune import tiny
    from fedtune.client.runtime import _build
    from fedtune.client.settings import SiteSettings
    from helpers import tiny_config

    rows = tiny.separable_rows(300, seed=5)
    smaller = tiny.write_csv(rows[:-1], tmp_path / "smaller" / "site.csv")
    larger = tiny.write_csv(rows, tmp_path / "larger" / "site.csv")  # the same rows and one more at the end

    def split(path, *sets):
        toml = tiny_config(tiny_models["bert"], overrides=['data.labels=["neg","pos"]', *sets]).to_toml()
        site = _build(toml, SiteSettings.model_validate({"site-id": "s", "data-path": str(path),
                                                         "state-dir": str(tmp_path / "st")}), tmp_path / "st")
        return set(site.data.train.rows), set(site.data.eval.rows)

    train, test = split(smaller)
    assert 0.1 < len(test) / 300 < 0.3  # the site's default 0.2
    assert split(smaller, "train.seed=7", "federation.site_test_fraction=0.9") == (train, test)  # requests only
    more_train, more_test = split(larger)
    assert more_train - train <= {len(rows)} and more_test - test <= {len(rows)}  # only the new row is new
    assert train <= more_train and test <= more_test  # and no other row moved
