"""Each site owns and enforces its privacy budget (ledger + accountant), in the federation."""

import json

import pytest

from fedtune import tiny
from fedtune.config import PrivacyConfig, load_config
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.simulate import simulate
from fedtune.client.budget import BudgetRefusal, round_noise
from fedtune.client.policy import SitePolicy, run_terms


def _noise(target=8.0, lifetime=10.0, max_noise=20.0, accountant="rdp", prior=(), q=0.05, steps=300, rounds=1,
           fixed=None):
    policy = SitePolicy(lifetime_epsilon=lifetime, max_noise_multiplier=max_noise)
    terms = run_terms(policy, PrivacyConfig(target_epsilon=target, accountant=accountant, noise_multiplier=fixed),
                      10_000)
    sigma, _, plan = round_noise(terms, policy, plan=None, run_rounds_done=0, run_history=[], prior=list(prior),
                                 rounds=rounds, steps=steps, sample_rate=q, lifetime_delta=1e-5)
    return sigma, plan


def test_noise_for_a_plan_fits_the_remaining_lifetime_budget():
    prior = [(1.0, 0.05, 200)]
    spent_before = compute_epsilon(prior, 1e-5, "rdp")
    sigma, plan = _noise(lifetime=6.0, prior=prior)
    total = compute_epsilon(prior + [(sigma, 0.05, 300)], 1e-5, "rdp")
    assert spent_before < total <= 6.0 and total > 5.9  # the lifetime cap binds, not the run's 8
    assert plan.noise_multiplier == sigma and plan.rounds == 1 and plan.target_epsilon == 8.0


def test_noise_for_a_plan_without_prior_meets_the_run_target():
    sigma, _ = _noise(target=3.0, accountant="prv", q=0.1, steps=50)
    assert 2.9 <= compute_epsilon([(sigma, 0.1, 50)], 1e-5, "prv") <= 3.0


def test_site_refuses_a_plan_past_its_budget():
    with pytest.raises(BudgetRefusal, match="lifetime cap is spent"):
        _noise(lifetime=1.0, q=0.1, steps=10, prior=[(0.5, 0.1, 500)])
    with pytest.raises(BudgetRefusal, match="even with noise multiplier 5, this site's maximum"):
        _noise(lifetime=0.01, max_noise=5, q=0.5, steps=1000)
    with pytest.raises(BudgetRefusal, match="fixed noise multiplier 0.6"):
        _noise(lifetime=1.0, fixed=0.6, q=0.1, steps=100)
    sigma, _ = _noise(fixed=3.0, q=0.1, steps=100)  # a fixed noise that fits is used as sent
    assert sigma == 3.0


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-sites")
    files = [tiny.write_csv(tiny.separable_rows(60, seed=20 + i), root / f"site-{i}.csv") for i in range(4)]
    return files, tiny.write_csv(tiny.separable_rows(60, seed=98), root / "eval.csv")


def _cfg(model, files, held, state_dir, extra=()):
    return load_config(None, [
        f'model.name="{model}"', "model.max_length=24", "lora.r=4", "train.batch_size=16",
        f'data.eval="{held}"', f"federation.sites={len(files)}", "federation.rounds=2",
        "federation.partition=files", "federation.site_files=[" + ",".join(f'"{f}"' for f in files) + "]",
        f'federation.site_state_dir="{state_dir}"', "privacy.accountant=rdp", *extra,
    ])


def _ledger(state_dir, site):
    return PrivacyLedger(state_dir / site / "privacy-ledger.jsonl")


@pytest.mark.slow
def test_a_site_at_its_limit_refuses_and_the_run_goes_on(tiny_models, four_sites, tmp_path):
    files, held = four_sites
    state = tmp_path / "state"
    cfg = _cfg(tiny_models["bert"], files, held, state,
               ['federation.site_privacy={"site-3"={lifetime_epsilon=0.05, max_noise_multiplier=5.0}}'])
    out = tmp_path / "run"
    assert simulate(cfg, out, cpus=2) == "completed"
    assert _ledger(state, "site-3").entries() == []  # never trained
    for site in ("site-0", "site-1", "site-2"):  # each round trained, then its evaluation answered (noised)
        assert [(e.round, e.kind) for e in _ledger(state, site).entries()] == [
            (1, None), (1, "evaluate"), (2, None), (2, "evaluate")]
    privacy = json.loads((out / "privacy.json").read_text())
    assert "site-3" in privacy["refused"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("site-3" not in r["sites"] for r in records)
    assert "site-3" in (out / "privacy.md").read_text()
    # The coordinator learns only that site-3 refused for its budget; the numbers stay at the site.
    assert "site-3: refused (privacy budget)" in records[1]["failure_reasons"]
    coordinator_side = "".join(p.read_text() for p in (out / "metrics.jsonl", out / "privacy.json", out / "privacy.md"))
    assert "maximum" not in coordinator_side and "noise multiplier" not in records[1]["failure_reasons"][0]
    assert "this site's maximum" in (state / "site-3" / "site.log").read_text()


@pytest.mark.slow
def test_too_few_sites_left_ends_the_run_cleanly(tiny_models, four_sites, tmp_path):
    files, held = four_sites
    state = tmp_path / "state"
    # SecAgg+ over 3 sites unmasks with 2 (its threshold); this run asks for all 3 every round
    cfg = _cfg(tiny_models["bert"], files[:3], held, state,
               ['federation.site_privacy={"site-2"={lifetime_epsilon=0.05, max_noise_multiplier=5.0}}',
                "federation.min_sites=3"])
    out = tmp_path / "run"
    ended = simulate(cfg, out, cpus=2)
    assert ended.startswith("stopped") and "SecAgg+" in ended and "3 needed" in ended
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    assert _ledger(state, "site-2").entries() == []


@pytest.mark.slow
def test_a_second_run_starts_from_the_budget_already_spent(tiny_models, four_sites, tmp_path):
    files, held = four_sites
    state = tmp_path / "state"
    extra = ["privacy.target_epsilon=2.0", 'federation.site_privacy={"site-0"={lifetime_epsilon=2.5}}']
    cfg = _cfg(tiny_models["bert"], files[:3], held, state, extra)
    simulate(cfg, tmp_path / "run1", cpus=2)
    first = json.loads((tmp_path / "run1" / "privacy.json").read_text())["sites"]
    simulate(cfg, tmp_path / "run2", cpus=2)
    second = json.loads((tmp_path / "run2" / "privacy.json").read_text())["sites"]
    # site-1 has no lifetime cap: each run spends its 2, and the total composes both
    assert second["site-1"]["epsilon_total"] > second["site-1"]["epsilon"] + 0.5
    assert second["site-1"]["epsilon_total"] == pytest.approx(
        _ledger(state, "site-1").epsilon(_ledger(state, "site-1").entries()[0].dataset, 1e-5, "rdp"), rel=1e-9)
    # site-0's lifetime cap of 2.5 binds in the second run (two runs at 2 compose to more): more noise
    assert second["site-0"]["noise_multiplier"] > first["site-0"]["noise_multiplier"]
    assert 2.4 < second["site-0"]["epsilon_total"] <= 2.5 + 1e-6
    assert len({e.run_id for e in _ledger(state, "site-0").entries()}) == 2


def test_site_noise_key_is_private_and_stable_and_seeds_are_fresh(tmp_path):
    import os
    import stat

    from fedtune.client.secret import dp_seeds, site_key

    key = site_key(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "dp-noise.key").st_mode) == 0o600
    assert site_key(tmp_path) == key  # never overwritten
    one, two = dp_seeds(key, "run", 1), dp_seeds(key, "run", 1)
    assert one.sample != one.noise != one.other != one.sample  # domain-separated streams
    assert set(one).isdisjoint(two)  # a re-sent (run, round) never draws the same randomness
