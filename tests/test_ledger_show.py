"""`fedtune ledger show`: a site's budget recomputed from its own ledger; inf epsilon shown as such."""

import json
import math

import pytest

from fedtune.cli import main
from fedtune.client.ledger_view import ledger_view
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.display import NO_DP, epsilon_record, format_epsilon, worst_epsilon
from fedtune.privacy.ledger import PrivacyLedger

ENTRY = {"max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}


def _write(state, spends):
    ledger = PrivacyLedger(state / "privacy-ledger.jsonl")
    for dataset, run_id, rnd, noise, q, steps, *k in spends:
        ledger.append({"dataset": dataset, "run_id": run_id, "round": rnd, "steps": steps, "sample_rate": q,
                       "noise_multiplier": noise, **ENTRY, **({"rows_per_unit": k[0]} if k else {})})
    return ledger


SPENDS = [("ds-a", "run-1", 1, 1.1, 0.05, 40), ("ds-a", "run-1", 2, 1.1, 0.05, 40),
          ("ds-b", "run-1", 1, 2.0, 0.1, 10), ("ds-a", "run-2", 1, 0.9, 0.05, 40)]


def test_ledger_show_recomputes_epsilon_per_dataset_and_run(tmp_path, capsys):
    _write(tmp_path, SPENDS)
    view = ledger_view(tmp_path, lifetime_cap=5.0)
    assert view.verified and view.entries == 4 and [d.dataset for d in view.datasets] == ["ds-a", "ds-b"]
    a = view.datasets[0]
    expected = compute_epsilon([(1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.05, 40)], 1e-5, "rdp")
    assert a.epsilon == pytest.approx(expected) and a.left == pytest.approx(5.0 - expected)
    assert [(r.run_id, r.rounds, r.steps) for r in a.runs] == [("run-1", [1, 2], 80), ("run-2", [1], 40)]
    assert a.runs[0].epsilon == pytest.approx(compute_epsilon([(1.1, 0.05, 80)], 1e-5, "rdp"))

    assert main(["ledger", "show", "--state-dir", str(tmp_path), "--lifetime-epsilon", "5"]) == 0
    out = capsys.readouterr().out
    assert "hash chain: verified" in out and "dataset ds-a" in out and "lifetime cap 5" in out
    assert f"epsilon spent {expected:.4g}" in out and f"left {5 - expected:.4g}" in out
    assert "run-2" in out and "1-2" in out


def test_ledger_show_reads_the_cap_from_the_site_settings(tmp_path, capsys):
    _write(tmp_path, SPENDS[:1])
    settings = tmp_path / "site.toml"
    settings.write_text('data-path = "x.csv"\nlifetime-epsilon = 3.5\n')
    assert main(["ledger", "show", "--state-dir", str(tmp_path), "--settings", str(settings), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["datasets"][0]["lifetime_cap"] == 3.5 and data["verified"] is True


def test_a_tampered_ledger_fails_verification_and_is_still_shown(tmp_path, capsys):
    _write(tmp_path, SPENDS)
    path = tmp_path / "privacy-ledger.jsonl"
    lines = path.read_text().splitlines()
    edited = json.loads(lines[3])
    edited["noise_multiplier"] = 50.0  # pretend run-2 spent almost nothing
    lines[3] = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    assert main(["ledger", "show", "--state-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT VERIFY" in out and "entry 4 was modified" in out and "cannot be trusted" in out
    assert not ledger_view(tmp_path).verified


def test_ledger_show_group_privacy_and_no_noise(tmp_path):
    _write(tmp_path, [("ds-u", "r", 1, 1.0, 0.1, 20, 3), ("ds-z", "r", 1, 0.0, 0.1, 5)])
    unit, zero = ledger_view(tmp_path).datasets
    assert unit.rows_per_unit == 3 and unit.epsilon_unit == pytest.approx(3 * unit.epsilon)
    assert unit.delta_unit == pytest.approx(3 * math.exp(2 * unit.epsilon) * 1e-5)
    assert math.isinf(zero.epsilon)
    assert main(["ledger", "show", "--state-dir", str(tmp_path), "--lifetime-epsilon", "10"]) == 0


def test_ledger_show_without_a_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["ledger", "show", "--state-dir", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# -- epsilon that is not a number is shown as what it is -------------------------------------

@pytest.mark.parametrize("value, accountant, record, shown", [
    (1.23456, "rdp", 1.23456, "1.235"),
    (math.inf, "rdp", "inf", "inf"),                  # noise 0: infinite, not blank
    (math.inf, "none", NO_DP, NO_DP),                 # no DP at all
    (None, None, None, "-"),                          # nothing recorded (round 0)
])
def test_epsilon_record_and_format(value, accountant, record, shown):
    assert epsilon_record(value, accountant) == record
    assert format_epsilon(epsilon_record(value, accountant), accountant) == shown
    json.dumps(record, allow_nan=False)  # records stay valid JSON


def test_worst_epsilon():
    assert worst_epsilon([1.0, 3.0, None]) == 3.0
    assert worst_epsilon([1.0, "inf"]) == "inf"
    assert worst_epsilon(["inf", NO_DP, 2.0]) == NO_DP
    assert worst_epsilon([None]) is None


def test_reports_show_inf_and_no_dp_rather_than_a_blank(tmp_path):
    from fedtune.federation.privacy_report import write_privacy_report
    from fedtune.federation.summary import format_summary

    records = [
        {"round": 0, "central": {"accuracy": 0.5, "loss": 0.7}, "sites": {}},
        {"round": 1, "central": {"accuracy": 0.6, "loss": 0.6}, "sites": {"a": {"epsilon": 0.5}, "b": {"epsilon": "inf"}}},
        {"round": 2, "central": {"accuracy": 0.6, "loss": 0.6}, "sites": {"a": {"epsilon": NO_DP}}},
    ]
    table = format_summary(records).splitlines()
    end = table[0].index("max eps") + len("max eps")  # cells are right-aligned under their header
    assert [line[:end].rstrip().endswith(v) for line, v in zip(table[2:5], ["-", " inf", NO_DP])] == [True] * 3

    privacy = {"enabled": True, "target_epsilon": 2.0, "delta": 1e-5, "secure_aggregation": True, "sites": {
        "a": {"epsilon": "inf", "epsilon_total": "inf", "accountant": "rdp", "noise_multiplier": 0.0},
        "b": {"epsilon": NO_DP, "epsilon_total": NO_DP, "accountant": "none"},
        "c": {"epsilon": 1.5, "epsilon_total": 2.5, "accountant": "rdp", "rows_per_unit": 2,
              "epsilon_unit": 3.0, "delta_unit": 5e-5},
    }}
    write_privacy_report(privacy, tmp_path / "privacy.md")
    text = (tmp_path / "privacy.md").read_text()
    assert "| a | inf | inf |" in text and f"| b | {NO_DP} | {NO_DP} |" in text and "| c | 1.5 | 2.5 |" in text
    assert "| c | 2 | 3 | 5e-05 |" in text
    assert "What still travels in the clear" in text and "report-train-loss" in text


def test_plots_skip_an_epsilon_that_is_not_a_number(tmp_path):
    from fedtune.federation.plots import write_plots

    records = [{"round": 0, "central": {"accuracy": 0.5, "loss": 0.7}, "sites": {}},
               {"round": 1, "central": {"accuracy": 0.6, "loss": 0.6}, "target_epsilon": 2.0,
                "sites": {"a": {"epsilon": 0.5}, "b": {"epsilon": "inf"}, "c": {"epsilon": NO_DP}}}]
    paths = write_plots(records, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
