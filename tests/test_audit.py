"""The privacy audit: its bounds against known values and a simulated Gaussian mechanism, the
canaries' way into one simulated site's rows, and the command's checks. The end-to-end audits
(without DP: a bound of at least 1; at epsilon 1: at most 1) are the audit benchmark's tiny
mode, in tests/test_benchmarks.py."""

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest

from fedtune.audit import bounds
from fedtune.audit.canaries import (CANARY_ENV, inclusion_bits, join_canaries, make_canaries, vocabulary_words,
                                    write_included)
from fedtune.audit.run import AuditResult, best_guesses, check_canaries_joined, verdict
from fedtune.cli import main
from fedtune.data.cleaning import ROW
from fedtune.model import load_tokenizer
from fedtune.config import load_config


@pytest.mark.parametrize("guesses, expected", [(100, 3.49), (1000, 5.81)])
def test_steinke_bound_matches_the_papers_worked_figures(guesses, expected):
    # Steinke, Nasr and Jagielski (2023): all guesses right, 95% confidence, delta 0.
    assert bounds.steinke_bound(guesses, guesses, guesses, 0.0, 0.95) == pytest.approx(expected, abs=0.01)
    # The same in closed form: logit(0.05 ** (1 / r)).
    p = 0.05 ** (1 / guesses)
    assert bounds.steinke_bound(guesses, guesses, guesses, 0.0, 0.95) == pytest.approx(np.log(p / (1 - p)), abs=1e-4)


def test_bounds_are_zero_at_chance_and_grow_with_right_guesses():
    assert bounds.lower_bounds(200, 100, 50, 1e-5, 0.99)["epsilon_lower_bound"] == 0.0
    found = [bounds.lower_bounds(200, 100, v, 1e-5, 0.99)["epsilon_lower_bound"] for v in (70, 85, 100)]
    assert 0 < found[0] < found[1] < found[2]
    # delta only weakens what a result refutes.
    assert bounds.steinke_bound(1000, 100, 95, 1e-3, 0.99) < bounds.steinke_bound(1000, 100, 95, 0.0, 0.99)
    with pytest.raises(ValueError, match="guesses"):
        bounds.steinke_bound(10, 20, 5, 0.0, 0.99)


def test_gaussian_curve_through_an_epsilon_delta_point():
    mu = bounds.gaussian_mu(1.0, 1e-5)
    assert bounds.gaussian_delta(1.0, mu) == pytest.approx(1e-5, rel=1e-6)
    assert bounds.gaussian_mu(2.0, 1e-5) > mu


def test_fdp_bound_is_tighter_with_many_guesses_and_valid_on_a_gaussian_mechanism():
    # Mahloujifar et al. (2024): against the Gaussian curve many right guesses refute more.
    assert bounds.fdp_bound(1000, 1000, 1000, 1e-5, 0.99) > bounds.steinke_bound(1000, 1000, 1000, 1e-5, 0.99)
    # A mechanism that is exactly mu-GDP per canary (score = mu * included + N(0, 1)): the bound
    # must not exceed its true epsilon, and must see most of it.
    rng = np.random.default_rng(7)
    true_eps = 4.0
    mu = bounds.gaussian_mu(true_eps, 1e-5)
    found = []
    for _ in range(5):
        included = rng.random(1000) < 0.5
        scores = mu * included + rng.normal(size=1000)
        found.append(best_guesses(scores, included, 1e-5, 0.99).bounds["epsilon_lower_bound"])
    assert max(found) <= true_eps
    assert np.mean(found) > 1.0


def test_best_guesses_guesses_the_top_in_and_the_bottom_out():
    included = np.array([True] * 50 + [False] * 50)
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 100)
    found = best_guesses(scores, included, 1e-5, 0.99)
    assert found.correct == found.guesses == 50  # the largest k tried (25 a side), all right
    assert found.bounds["epsilon_lower_bound"] > 1
    # Scores unrelated to inclusion: nothing refuted.
    assert best_guesses(np.zeros(100), included, 1e-5, 0.99).bounds["epsilon_lower_bound"] < 0.5


def test_canaries_are_distinct_rows_of_the_models_words_with_the_runs_labels(tiny_models):
    cfg = load_config(None, [f'model.name="{tiny_models["bert"]}"'])
    tok = load_tokenizer(cfg.model)
    words = set(vocabulary_words(tok))
    rows = make_canaries(60, tok, "sequence-classification", ["text", "label"], ["a", "b", "c"], seed=1)
    assert len(rows) == 60 and rows["text"].nunique() == 60
    assert set(rows["label"]) <= {"a", "b", "c"} and len(set(rows["label"])) == 3
    assert all(set(t.split()) <= words for t in rows["text"])
    assert rows[ROW].min() > 10**9  # never a file's row number
    gen = make_canaries(5, tok, "causal-lm", ["prompt", "response"], None, seed=1)
    assert list(gen.columns[:2]) == ["prompt", "response"] and gen["response"].str.split().str.len().min() >= 4
    bits = inclusion_bits(2000)
    assert 0.45 < bits.mean() < 0.55


def test_a_real_tokenizers_canaries_are_letter_strings_without_unknown_tokens():
    # The bundled MiniLM's WordPiece vocabulary spells random letters with sub-word pieces.
    tok = load_tokenizer(load_config(None, ['model.name="sentence-transformers/all-MiniLM-L6-v2"']).model)
    rows = make_canaries(50, tok, "sequence-classification", ["text", "label"], ["a", "b"], seed=2)
    assert all(w.isalpha() and w.islower() for t in rows["text"] for w in t.split())
    ids = tok(rows["text"].tolist())["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert len({tuple(r) for r in ids}) == 50


def _rows():
    return pd.DataFrame({"text": ["x y", "y z"], "label": ["a", "b"], ROW: [1, 2]})


def test_only_the_audited_simulated_site_joins_the_included_canaries(tmp_path, monkeypatch, tiny_models):
    cfg = load_config(None, [f'model.name="{tiny_models["bert"]}"'])
    canaries = make_canaries(20, load_tokenizer(cfg.model), "sequence-classification", ["text", "label"],
                             ["a", "b"], seed=3)
    included = np.arange(20) % 2 == 0
    path = write_included(tmp_path / "c.json", "site-1", canaries, included)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    handed = json.loads(path.read_text())
    assert handed["site"] == "site-1" and len(handed["rows"]) == 10  # the included ones, no bits
    assert "included" not in path.read_text()

    # Without the variable, or for another site, or a deployed site: the rows unchanged.
    assert len(join_canaries(_rows(), ["text", "label"], "site-1", True)) == 2
    monkeypatch.setenv(CANARY_ENV, str(path))
    assert len(join_canaries(_rows(), ["text", "label"], "site-0", True)) == 2
    assert len(join_canaries(_rows(), ["text", "label"], "site-1", False)) == 2
    joined = join_canaries(_rows(), ["text", "label"], "site-1", True)
    assert len(joined) == 12
    assert set(joined["text"][2:]) == set(canaries.loc[included, "text"])
    with pytest.raises(ValueError, match="columns"):
        join_canaries(_rows(), ["text", "topic"], "site-1", True)


def test_a_bound_above_the_accountants_epsilon_is_reported_as_a_privacy_bug():
    common = dict(epsilon_lower_bound_steinke=0.0, delta=1e-5, canaries=100, included=50, guesses=50,
                  correct=50, confidence=0.99, site="site-0")
    bug = AuditResult(epsilon=1.0, epsilon_lower_bound=2.1, epsilon_lower_bound_fdp=2.1, violated=True, **common)
    assert verdict(bug).startswith("PRIVACY BUG")
    fine = AuditResult(epsilon=8.0, epsilon_lower_bound=2.1, epsilon_lower_bound_fdp=2.1, violated=False, **common)
    assert verdict(fine).startswith("Consistent") and "does not" in verdict(fine)


def test_the_command_checks_its_arguments_before_any_training(tmp_path, capsys):
    assert main(["audit", "--out", str(tmp_path / "a"), "--canaries", "5"]) == 2
    assert "--canaries 5" in capsys.readouterr().err
    assert main(["audit", "--out", str(tmp_path / "b"), "--site", "site-9"]) == 2
    assert "--site site-9" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_audit_whose_site_never_joined_its_canaries_fails_instead_of_passing(tmp_path):
    log = tmp_path / "sites.log"
    log.write_text("site-0: 48 audit canaries join its 30 training rows\n")
    check_canaries_joined(log, "site-0", 48)
    with pytest.raises(RuntimeError, match="nothing was audited"):
        check_canaries_joined(log, "site-0", 47)
    with pytest.raises(RuntimeError, match="nothing was audited"):
        check_canaries_joined(tmp_path / "absent.log", "site-0", 48)

