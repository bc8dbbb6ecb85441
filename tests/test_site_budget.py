"""Each site owns and enforces its privacy budget (ledger + accountant), in the federation."""

import json

import pytest

from fedtune import tiny
from fedtune.config import PrivacyConfig, SitePrivacy, load_config
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.simulate import simulate
from fedtune.client.budget import BudgetRefusal, check_round, choose_noise


def test_noise_for_a_plan_fits_the_remaining_lifetime_budget():
    privacy = PrivacyConfig(target_epsilon=8.0, accountant="rdp")
    own = SitePrivacy(lifetime_epsilon=6.0)
    prior = [(1.0, 0.05, 200)]
    spent_before = compute_epsilon(prior, 1e-5, "rdp")
    sigma = choose_noise(privacy, own, 0.05, 300, prior)
    total = compute_epsilon(prior + [(sigma, 0.05, 300)], 1e-5, "rdp")
    assert spent_before < total <= 6.0 and total > 5.9  # the lifetime cap binds, not the run's 8


def test_noise_for_a_plan_without_prior_meets_the_run_target():
    privacy = PrivacyConfig(target_epsilon=3.0, accountant="prv")
    sigma = choose_noise(privacy, SitePrivacy(), 0.1, 50, [])
    assert 2.9 <= compute_epsilon([(sigma, 0.1, 50)], 1e-5, "prv") <= 3.0


def test_site_refuses_a_plan_past_its_budget():
    privacy = PrivacyConfig(target_epsilon=8.0, accountant="rdp")
    with pytest.raises(BudgetRefusal, match="lifetime budget spent"):
        choose_noise(privacy, SitePrivacy(lifetime_epsilon=1.0), 0.1, 10, [(0.5, 0.1, 500)])
    with pytest.raises(BudgetRefusal, match="above this site's maximum"):
        choose_noise(privacy, SitePrivacy(lifetime_epsilon=0.01, max_noise_multiplier=5), 0.5, 1000, [])
    with pytest.raises(BudgetRefusal, match="past the lifetime cap"):
        check_round(privacy, SitePrivacy(lifetime_epsilon=1.0), [(0.6, 0.1, 100)], 0.6, 0.1, 100)


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
    for site in ("site-0", "site-1", "site-2"):
        assert [e.round for e in _ledger(state, site).entries()] == [1, 2]
    privacy = json.loads((out / "privacy.json").read_text())
    assert "site-3" in privacy["refused"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("site-3" not in r["sites"] for r in records)
    assert "site-3" in (out / "privacy.md").read_text()


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


def test_site_noise_key_is_private_and_stable(tmp_path):
    import os
    import stat

    from fedtune.client.secret import round_seed, site_key

    key = site_key(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "dp-noise.key").st_mode) == 0o600
    assert site_key(tmp_path) == key  # never overwritten: a resumed run draws the same noise
    assert round_seed(key, "run", 1) == round_seed(key, "run", 1) != round_seed(key, "run", 2)
    assert round_seed(site_key(tmp_path / "other"), "run", 1) != round_seed(key, "run", 1)
