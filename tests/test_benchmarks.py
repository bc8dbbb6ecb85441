"""Each benchmark's tiny mode (tiny model, a few steps), so that the scripts cannot rot. The
real runs and their numbers are in simulations/RESULTS.md, not here."""

import json
import math

import pytest

from simulations.bench import run_all, scale, secagg_cost, step_time, traffic, utility
from simulations.bench.common import SHARED_DATA


def _saved(out, name):
    data = json.loads((out / f"{name}-tiny.json").read_text())
    assert data["benchmark"] == name and data["machine"]["cores"] >= 1 and data["table"].startswith("|")
    return data


@pytest.mark.slow
def test_step_time_interleaves_dp_and_non_dp_steps(tmp_path):
    step_time.run("tiny", tmp_path)
    data = _saved(tmp_path, "step_time")
    by = {(r["variant"], r["precision"]): r for r in data["results"]}
    assert {"non-DP", "DP hooks", "DP ghost"} <= {v for v, _ in by}
    for r in by.values():
        assert len(r["samples_ms"]) == data["repeats"] and all(t > 0 for t in r["samples_ms"])
        assert math.isfinite(r["ratio_vs_non_dp"]) and r["ratio_vs_non_dp"] > 0
    assert by[("non-DP", "fp32")]["ratio_vs_non_dp"] == 1.0


@pytest.mark.slow
def test_traffic_is_measured_on_the_real_messages(tmp_path):
    traffic.run("tiny", tmp_path)
    data = _saved(tmp_path, "traffic")
    runs = {(r["ffa"], r["secure_aggregation"]): r for r in data["results"]}
    lora_secure, lora_plain, ffa_secure = runs[(False, True)], runs[(False, False)], runs[(True, True)]
    # SecAgg+ sends int64 masked values (8 bytes) where plain FedAvg sends fp32 (4 bytes).
    assert 1.6 < lora_secure["bytes_up_per_site"] / lora_plain["bytes_up_per_site"] < 2.4
    # FFA-LoRA never sends A: less than LoRA, in both directions.
    assert ffa_secure["bytes_up_per_site"] < lora_secure["bytes_up_per_site"]
    assert ffa_secure["bytes_down_per_site"] < lora_secure["bytes_down_per_site"]
    assert all(0 < r["up_share_of_model"] < 1 for r in data["results"])


@pytest.mark.slow
def test_secagg_cost_compares_round_times(tmp_path):
    secagg_cost.run("tiny", tmp_path)
    (result,) = _saved(tmp_path, "secagg_cost")["results"]
    assert result["plain_round_s"] > 0 and result["secagg_round_s"] > 0
    assert result["ratio"] == pytest.approx(result["secagg_round_s"] / result["plain_round_s"])


@pytest.mark.slow
def test_scale_samples_sites_and_measures_peak_memory(tmp_path):
    scale.run("tiny", tmp_path)
    (result,) = _saved(tmp_path, "scale")["results"]
    assert result["sites"] == 6 and result["sites_per_round"] == 3  # fraction_train samples 3 of 6
    assert 100 * 2**20 < result["peak_rss_bytes"] < 16 * 2**30  # Ray and torch: well above 100 MiB
    assert result["seconds_per_round"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real SST-2 / AG News) is absent")
def test_utility_runs_federated_and_centralized_on_real_data(tmp_path):
    utility.run("tiny", tmp_path)
    data = _saved(tmp_path, "utility")
    kinds = sorted((r["kind"], r.get("dp")) for r in data["results"])
    assert kinds == [("centralized", False), ("centralized", True), ("federated", None)]
    fed = next(r for r in data["results"] if r["kind"] == "federated")
    assert [x["round"] for x in fed["rounds"]] == [0, 1, 2]
    assert 0 < fed["epsilon_spent"] <= 8.0 + 1e-6
    assert (tmp_path / data["plots"][0]).stat().st_size > 10_000


def test_run_all_writes_a_summary_of_the_tables(tmp_path, monkeypatch):
    ran = []
    for name, module in run_all.BENCHMARKS.items():
        monkeypatch.setattr(module, "run", lambda size, out, _n=name: ran.append((_n, size)) or {"table": f"|{_n}|"})
    path = run_all.run_all("tiny", tmp_path, only=["traffic", "scale"])
    assert ran == [("traffic", "tiny"), ("scale", "tiny")]
    text = path.read_text()
    assert "## traffic" in text and "|scale|" in text and "## utility" not in text
