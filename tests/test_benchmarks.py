"""Each benchmark's tiny mode (tiny random model, a few steps, few sites), so that the scripts
cannot rot and what they measure is checked. The real runs and their numbers are in
simulations/RESULTS.md, not here."""

import json
import math

import psutil
import pytest

from simulations.benchmarks import (
    ablation, audit, deploy_load, deploy_vs_sim, run_all, scale, secagg_cost, secagg_shares, small_sites, step_time,
    traffic, utility)
from simulations.benchmarks.common import SHARED_DATA, table
from simulations.benchmarks.memory import PeakMemory


def _saved(out, name):
    data = json.loads((out / f"{name}-tiny.json").read_text())
    assert data["benchmark"] == name and data["size"] == "tiny"
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    assert data["table"].startswith("|")
    return data


def test_table_is_markdown():
    text = table(["a", "b"], [[1.23456, None], ["x", True]])
    assert text.splitlines() == ["| a     | b   |", "|-------|-----|", "| 1.235 | -   |", "| x     | yes |"]


def test_peak_memory_counts_this_process():
    with PeakMemory(interval_s=0.05) as memory:
        block = bytearray(64 * 2**20)  # touched: resident
        import time

        time.sleep(0.3)
    assert memory.samples >= 1 and memory.peak > len(block)


def test_peak_memory_keeps_a_tracked_process_tree_apart():
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(96 * 2**20); import time; time.sleep(3)"])
    try:
        with PeakMemory(interval_s=0.05) as memory:
            memory.track("child", child.pid)
            time.sleep(1.0)
    finally:
        child.kill()
        child.wait()
    assert 96 * 2**20 < memory.peaks["child"] < memory.peak
    assert PeakMemory.tree_rss(child.pid) == 0  # gone


@pytest.mark.slow
def test_step_time_interleaves_dp_and_non_dp_steps(tmp_path):
    step_time.run("tiny", tmp_path)
    data = _saved(tmp_path, "step_time")
    by = {(r["variant"], r["precision"]): r for r in data["results"]}
    assert {"non-DP", "DP hooks", "DP ghost"} <= {v for v, _ in by}
    for r in by.values():
        assert len(r["samples_ms"]) == data["repeats"] and all(t > 0 for t in r["samples_ms"])
        assert math.isfinite(r["ratio_vs_non_dp"]) and r["ratio_vs_non_dp"] > 0
        assert math.isfinite(r["paired_ratio_median"]) and r["paired_ratio_median"] > 0
    assert by[("non-DP", "fp32")]["ratio_vs_non_dp"] == 1.0
    # bf16 is either timed or said to be unsupported, never silently left out.
    assert ("non-DP", "bf16") in by or "not supported" in data["bf16"]


@pytest.mark.slow
def test_traffic_is_measured_on_the_real_messages(tmp_path):
    traffic.run("tiny", tmp_path)
    data = _saved(tmp_path, "traffic")
    runs = {(r["ffa"], r["secure_aggregation"]): r for r in data["results"]}
    lora_secure, lora_plain, ffa_secure = runs[(False, True)], runs[(False, False)], runs[(True, True)]
    # SecAgg+ sends int64 masked values (8 bytes) where plain FedAvg sends fp32 (4 bytes).
    assert 1.5 < lora_secure["bytes_up_per_site"] / lora_plain["bytes_up_per_site"] < 2.5
    # FFA-LoRA never sends A: less than LoRA, in both directions.
    assert ffa_secure["bytes_up_per_site"] < lora_secure["bytes_up_per_site"]
    assert ffa_secure["bytes_down_per_site"] < lora_secure["bytes_down_per_site"]
    assert data["model_fp32_bytes"] > 0 and all(0 < r["up_share_of_model"] < 1 for r in data["results"])


@pytest.mark.slow
def test_secagg_cost_compares_round_times(tmp_path):
    secagg_cost.run("tiny", tmp_path)
    (result,) = _saved(tmp_path, "secagg_cost")["results"]
    assert result["sites"] == 3 and result["plain_round_s"] > 0 and result["secagg_round_s"] > 0
    assert result["ratio"] == pytest.approx(result["secagg_round_s"] / result["plain_round_s"])
    assert math.isfinite(result["ratio"])


def test_secagg_shares_runs_flowers_protocol_with_each_share_rule_and_the_sites_checks(tmp_path):
    secagg_shares.run("tiny", tmp_path)
    results = _saved(tmp_path, "secagg_shares")["results"]
    assert [(r["sites"], r["shares"]) for r in results] == [(4, 4), (4, 4), (8, 8), (8, 7)]
    for r in results:  # every site accepted the threshold (else the round halts) and the sum is exact
        assert r["shares"] / 2 < r["threshold"] < r["shares"]
        assert r["max_error"] < 1e-4 and r["site_max_s"] >= r["site_mean_s"] > 0 and r["coordinator_s"] > 0
    assert all(r["default"] for r in results if r["rule"] == "every site")  # 8 sites: up to 16 every site shares


@pytest.mark.slow
def test_scale_samples_sites_and_measures_peak_memory(tmp_path):
    scale.run("tiny", tmp_path)
    (result,) = _saved(tmp_path, "scale")["results"]
    assert result["sites"] == 6 and result["sites_per_round"] == 3  # fraction_train samples 3 of 6
    # The whole tree (Ray's services and workers, each with torch loaded): far above 100 MiB.
    assert 100 * 2**20 < result["peak_rss_bytes"] < 24 * 2**30
    assert result["seconds_per_round"] > 0


def _descendants() -> list[int]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
def test_deploy_load_times_a_real_deployments_round_and_its_stages(tmp_path):
    deploy_load.run("tiny", tmp_path)
    data = _saved(tmp_path, "deploy_load")
    (result,) = data["results"]
    assert result["sites"] == 2 and len(result["round_seconds"]) == 1 and result["ratio_vs_fewest"] == 1.0
    # The coordinator timed every SecAgg+ stage and both evaluations, in order; together they are the round.
    stages = result["stage_seconds"]
    assert list(stages) == deploy_load.STAGES and all(v > 0 for v in stages.values()), stages
    assert sum(stages.values()) == pytest.approx(result["seconds_per_round"], rel=0.02)
    assert result["run_wall_s"] > result["seconds_per_round"] and result["bytes_up_per_site"] > 0
    # Coordinator, two site agents, their Flower processes: each with torch loaded.
    assert 500 * 2**20 < result["peak_rss_bytes"] < 24 * 2**30
    # Each site agent's own tree (agent, SuperNode, worker with torch), and the coordinator's: parts of the whole.
    site, coordinator = result["site_peak_rss_bytes"], result["coordinator_peak_rss_bytes"]
    assert 200 * 2**20 < site["mean"] <= site["max"] and 100 * 2**20 < coordinator
    assert 2 * site["mean"] + coordinator <= result["peak_rss_bytes"] * 1.05
    assert (tmp_path / data["plots"][0]).stat().st_size > 10_000
    assert _descendants() == []  # every process of the deployment was stopped


def test_deploy_vs_sim_times_the_same_run_simulated_and_deployed(tmp_path):
    deploy_vs_sim.run("tiny", tmp_path)
    data = _saved(tmp_path, "deploy_vs_sim")
    sim, dep = data["simulated"], data["deployed"]
    assert len(sim["round_seconds"]) == len(dep["round_seconds"]) == 2
    assert data["ratio_steady_round"] == pytest.approx(dep["steady_round_s"] / sim["steady_round_s"])
    for side in (sim, dep):  # SecAgg+ on both sides: the same stages, timed by the same coordinator code
        assert {"setup", "key sharing", "training", "unmasking"} <= set(side["stage_seconds"]), side
    assert data["longest_protocol_exchange_s"] > 0
    # One long-lived worker per site: its model built once for the whole run.
    assert dep["model_builds"] == {"site-0": 1, "site-1": 1, "site-2": 1}
    assert _descendants() == []


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real SST-2 / AG News) is absent")
def test_utility_runs_federated_and_centralized_on_real_data(tmp_path):
    utility.run("tiny", tmp_path)
    data = _saved(tmp_path, "utility")
    kinds = sorted((r["kind"], r.get("dp"), r.get("variant")) for r in data["results"])
    # Tiny mode: the one federated run also evaluates federatedly (default size repeats the run instead).
    assert kinds == [("centralized", False, None), ("centralized", True, None),
                     ("federated", None, "federated evaluation")]
    fed = with_eval = next(r for r in data["results"] if r["kind"] == "federated")
    # The sites' noised answers next to the central accuracy of the same run.
    assert 0 <= with_eval["federated_accuracy"] <= 1 and with_eval["federated_answers"] == 3
    assert with_eval["federated_noise_points"] > 0 and with_eval["evaluation_noise_multiplier"] > 0
    assert "federated accuracy (noised)" in data["table"]
    assert [x["round"] for x in fed["rounds"]] == [0, 1, 2]
    assert all(0 <= x["accuracy"] <= 1 and 0 <= x["f1"] <= 1 for x in fed["rounds"])
    assert 0 < fed["epsilon_spent"] <= 8.0 + 1e-6
    assert len(fed["epsilon_per_site"]) == 3 and all(0 < e <= 8.0 + 1e-6 for e in fed["epsilon_per_site"].values())
    dp = next(r for r in data["results"] if r["kind"] == "centralized" and r["dp"])
    assert dp["epsilon_target"] == fed["epsilon_target"] == 8.0  # centralized DP at the federation's epsilon
    assert fed["points_below_centralized_dp"] is not None
    assert [p.rsplit("-", 1)[-1] for p in data["plots"]] == ["sst2.png", "epsilon.png"]
    assert all((tmp_path / p).stat().st_size > 10_000 for p in data["plots"])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real SST-2 / AG News) is absent")
def test_ablation_runs_each_variant_on_the_same_rows(tmp_path):
    ablation.run("tiny", tmp_path)
    data = _saved(tmp_path, "ablation")
    assert [r["variant"] for r in data["results"]] == ["defaults", ablation.VARIANTS[1][0]]
    base, old = data["results"]
    assert base["overrides"] == [] and old["overrides"] == list(ablation.PREVIOUS_DEFAULTS)
    assert base["points_vs_defaults"] == 0
    assert old["points_vs_defaults"] == pytest.approx(100 * (old["accuracy"] - base["accuracy"]))
    # Same rows and evaluation set: the same untrained start would score the same before round 1,
    # but the two recipes build different adapters (rank, frozen A), so only the rows are compared.
    assert all(0 < e <= 8.0 + 1e-6 for r in data["results"] for e in r["epsilon_per_site"].values())
    assert data["table"].count("\n") == 3 and "previous defaults" in data["table"]
    assert (tmp_path / data["plots"][0]).stat().st_size > 10_000


def test_ablation_reuses_the_utility_benchmarks_run_of_the_defaults(tmp_path, monkeypatch):
    g = utility.grid("tiny")
    rounds = [{"round": 0, "accuracy": 0.5, "f1": 0.4}, {"round": 1, "accuracy": 0.7, "f1": 0.6}]
    done = {"kind": "federated", "dataset": "sst2", "epsilon_target": 8.0, "accuracy": 0.7, "f1": 0.6,
            "epsilon_per_site": {"site-0": 7.9}, "rounds": rounds, "seconds": 12.0}
    saved = {"grid": {"sites": g.sites, "rows_per_site": g.rows_per_site, "rounds": g.rounds,
                      "local_epochs": g.local_epochs, "train": utility.TRAIN},
             "results": [dict(done, dataset="agnews-label"), done]}
    (tmp_path / "utility-tiny.json").write_text(json.dumps(saved))
    trained = []

    def federated(model, dataset, sites, epsilon, train, evaluation, g, work, variant, extra):
        trained.append(variant)
        return dict(done, accuracy=0.75, variant=variant, overrides=list(extra))

    from simulations.benchmarks import common

    monkeypatch.setattr(common, "SHARED_DATA", tmp_path)  # the real-data check passes
    monkeypatch.setattr(ablation, "model_name", lambda size, work: "model")
    monkeypatch.setattr(ablation, "data_files", lambda *a, **k: (tmp_path / "t", tmp_path / "e"))
    monkeypatch.setattr(ablation, "federated", federated)
    payload = ablation.run("tiny", tmp_path)
    assert trained == [ablation.VARIANTS[1][0]]          # the defaults were not trained again
    base, ffa = payload["results"]
    assert base["reused_from"] == "utility-tiny.json" and base["accuracy"] == 0.7
    assert ffa["points_vs_defaults"] == pytest.approx(5.0) and payload["complete"]
    # A utility run with other settings is not reused.
    saved["grid"]["train"] = utility.TRAIN + ["lora.r=4"]
    (tmp_path / "utility-tiny.json").write_text(json.dumps(saved))
    trained.clear()
    ablation.run("tiny", tmp_path)
    assert trained == ["defaults", ablation.VARIANTS[1][0]]


@pytest.mark.slow
def test_audit_sees_training_without_dp_and_stays_below_epsilon_1(tmp_path):
    """`fedtune audit`'s whole path, twice, on a tiny model: without DP (the sites' own switch) the
    canaries' bound is at least 1; at epsilon 1 it stays at or below 1, and the epsilon reported is
    the one the audited site's ledger gives."""
    from fedtune.privacy.composition import compose
    from fedtune.privacy.ledger import PrivacyLedger

    audit.run("tiny", tmp_path / "results", workdir=tmp_path)
    data = _saved(tmp_path / "results", "audit")
    no_dp, eps1 = data["results"]
    assert no_dp["epsilon"] is None and no_dp["epsilon_lower_bound"] >= 1, no_dp
    assert eps1["epsilon_lower_bound"] <= 1 and not eps1["violated"], eps1
    # The accountant's epsilon, recomputed here from site-0's ledger file.
    entries = [e for e in PrivacyLedger(tmp_path / "epsilon-1" / "run" / "sites" / "site-0" /
                                        "privacy-ledger.jsonl").entries() if not e.is_evaluation]
    assert len(entries) == 5 and eps1["epsilon"] == pytest.approx(compose(entries, 1e-5), rel=1e-9)
    assert 0.5 < eps1["epsilon"] <= 1.0
    for point in ("no-DP", "epsilon-1"):
        folder = tmp_path / point
        saved = json.loads((folder / "audit.json").read_text())
        assert set(saved) >= {"epsilon", "epsilon_lower_bound", "delta", "canaries", "guesses", "correct",
                              "confidence"}
        assert saved["canaries"] == 200 and saved["confidence"] == 0.99
        assert (folder / "audit-scores.png").stat().st_size > 0 and "audit-scores.png" in (folder / "audit.md").read_text()
    assert (tmp_path / "results" / data["plot"]).stat().st_size > 0
    # The canaries were trained on as site-0's rows: its sample rate counts them.
    log = (tmp_path / "epsilon-1" / "run" / "logs" / "sites.log").read_text()
    assert "audit canaries join" in log


@pytest.mark.parametrize("benchmark", [utility, ablation, small_sites])
def test_real_data_benchmarks_skip_with_a_reason_without_the_data(tmp_path, monkeypatch, benchmark):
    from simulations.benchmarks import common

    monkeypatch.setattr(common, "SHARED_DATA", tmp_path / "absent")
    payload = benchmark.run("tiny", tmp_path)
    assert "absent" in payload["skipped"] and not list(tmp_path.glob("*-tiny.json"))


def test_run_all_runs_in_order_and_summarises(tmp_path, monkeypatch):
    ran = []
    for name, module in run_all.BENCHMARKS.items():
        monkeypatch.setattr(module, "run", lambda size, out, _n=name: ran.append((_n, size)) or {"table": f"|{_n}|"})
    path = run_all.run_all("tiny", tmp_path, only=["traffic", "scale"])
    assert ran == [("traffic", "tiny"), ("scale", "tiny")]
    text = path.read_text()
    assert "## traffic" in text and "|scale|" in text and "## utility" not in text


def test_run_all_keeps_going_after_a_failure(tmp_path, monkeypatch):
    def broken(size, out):
        raise ValueError("boom")

    monkeypatch.setattr(traffic, "run", broken)
    monkeypatch.setattr(scale, "run", lambda size, out: {"table": "|scale|"})
    with pytest.raises(RuntimeError, match="traffic"):
        run_all.run_all("tiny", tmp_path, only=["traffic", "scale"])
    text = (tmp_path / "summary-tiny.md").read_text()
    assert "FAILED" in text and "boom" in text and "|scale|" in text


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real SST-2 / AG News) is absent")
def test_small_sites_compares_class_balance_settings_with_the_baselines_on_skewed_rows(tmp_path):
    small_sites.run("tiny", tmp_path, workdir=tmp_path / "work")
    data = _saved(tmp_path, "small_sites")
    g = small_sites.grid("tiny")
    # Each site's rows: its size and its majority share, no row at two sites.
    import pandas as pd

    frames = [pd.read_json(tmp_path / "work" / f"sst2-site-{i}.jsonl", lines=True, dtype=False) for i in range(3)]
    for frame, n, share in zip(frames, g.site_rows, g.site_majority):
        assert len(frame) == n and (frame["label"].astype(str) == "0").mean() == pytest.approx(share, abs=0.02)
    assert len(set().union(*(set(f["sentence"]) for f in frames))) == sum(g.site_rows)
    majority = data["majority"]["sst2"]
    assert 0.6 < majority["accuracy"] < 0.8 and majority["f1"] == pytest.approx(
        majority["accuracy"] / (1 + majority["accuracy"]))
    kinds = [(r["kind"], r.get("variant")) for r in data["results"]]
    assert kinds == [("probe", None), ("centralized", None), ("federated", "class_balance off"), ("federated", "defaults")]
    assert data["grid"]["variants"] == ["class_balance off", "defaults"]
    off, auto = data["results"][2:]
    # "auto" on these skewed rows: reweighted, with the coordinator's evaluation rows as the prior.
    assert (off["class_balance_sent"], off["class_prior"]) == ("off", [])
    assert auto["class_balance_sent"] == "reweighted" and max(auto["class_prior"]) >= 1.5 * min(auto["class_prior"])
    for r in data["results"]:
        assert 0 <= r["f1"] <= 1 and 1 <= r["predicted_classes"] <= 2
    for fed in data["results"][2:]:
        assert [x["round"] for x in fed["rounds"]] == [0, 1]
        assert all(0 < e <= 8.0 + 1e-6 for e in fed["epsilon_per_site"].values())
        assert fed["f1_above_majority"] == pytest.approx(fed["f1"] - majority["f1"], abs=1e-6)
        assert isinstance(fed["meets_target"], bool)
    assert "majority class" in data["table"]
    assert (tmp_path / data["plots"][0]).stat().st_size > 10_000
