import pytest
from fedtune.cli import main
from fedtune.config import load_config
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.plan import plan_site


def test_plan_noise_gives_at_most_the_budget_after_all_rounds():
    cfg = load_config(None, ["federation.rounds=5", "train.batch_size=16", "train.epochs=1", "privacy.accountant=rdp"])
    plan = plan_site(cfg, "site-0", 2000)
    assert plan.total_steps == 5 * 125
    assert abs(plan.noise_multiplier - 0.557) < 0.01  # the value measured in shared/notes
    eps = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.total_steps)], 1e-5, "rdp")
    assert eps == plan.epsilon and 7.9 < eps <= 8.0


def test_privacy_plan_command_prints_each_site(capsys):
    assert main(["privacy", "plan", "--examples", "400,2000", "--set", "federation.rounds=5",
                 "--set", "train.batch_size=16", "--set", "train.epochs=1", "--set", "privacy.accountant=rdp"]) == 0
    out = capsys.readouterr().out
    assert "site-0" in out and "site-1" in out and "0.5567" in out


def test_plan_applies_each_sites_own_budget():
    cfg = load_config(None, ["federation.rounds=2", "train.batch_size=16", "train.epochs=1", "privacy.accountant=rdp",
                             "privacy.target_epsilon=8.0",
                             'federation.site_privacy={"site-1"={target_epsilon=2.0, target_delta=1e-6}, '
                             '"site-2"={target_epsilon=50.0}}'])
    plans = {s: plan_site(cfg, s, 800) for s in ("site-0", "site-1", "site-2")}
    assert plans["site-0"].target_epsilon == 8.0 and plans["site-2"].target_epsilon == 8.0  # the stricter wins
    assert plans["site-1"].target_epsilon == 2.0 and plans["site-1"].delta == 1e-6
    assert plans["site-1"].noise_multiplier > plans["site-0"].noise_multiplier
    eps = compute_epsilon([(plans["site-1"].noise_multiplier, plans["site-1"].sample_rate,
                            plans["site-1"].total_steps)], 1e-6, "rdp")
    assert eps == plans["site-1"].epsilon and 1.9 < eps <= 2.0 and all(p.fits for p in plans.values())


def test_plan_with_a_fixed_noise_shows_what_it_costs_and_that_it_does_not_fit(tmp_path, capsys):
    settings = tmp_path / "site.toml"
    settings.write_text('data-path = "x.csv"\ntarget-epsilon = 2.0\nlifetime-epsilon = 10.0\n')
    assert main(["privacy", "plan", "--examples", "500", "--site-settings", str(settings),
                 "--set", "privacy.noise_multiplier=0.05", "--set", "privacy.accountant=rdp"]) == 0
    out = capsys.readouterr().out
    assert "NO: refused" in out
    plan = plan_site(load_config(None, ["privacy.noise_multiplier=0.0", "privacy.accountant=rdp"]), "s", 500)
    assert plan.epsilon == float("inf") and not plan.fits


def test_plan_warns_about_a_delta_at_or_above_one_over_n(capsys):
    assert main(["privacy", "plan", "--examples", "50,5000", "--set", "privacy.target_delta=0.05",
                 "--set", "privacy.accountant=rdp"]) == 0
    out = capsys.readouterr().out
    assert "WARNING site-0: delta 0.05 is at least 1/N for N = 50" in out and "WARNING site-1" in out


@pytest.mark.parametrize("examples, rounds, epsilon, accountant", [
    (2000, 5, 8.0, "rdp"), (300, 3, 3.0, "rdp"), (120, 4, 1.0, "rdp"), (800, 2, 8.0, "prv")])
def test_the_plan_train_local_auto_and_the_sites_budget_calibrate_the_same_noise(examples, rounds, epsilon,
                                                                                    accountant):
    """One calibration (fedtune/privacy/accounting.py: planned_noise) behind every place that
    plans noise: the preview a coordinator reads, auto's batch search, train-local and the site's
    budget, which decides, give the same number for the same rows, batch, steps and budget."""
    from fedtune.client.budget import round_noise
    from fedtune.client.policy import SitePolicy, run_terms
    from fedtune.config import PrivacyConfig
    from fedtune.privacy.accounting import planned_noise
    from fedtune.training.auto import resolve_train
    from fedtune.training.trainer import dp_sample_rate

    cfg = load_config(None, [f"federation.rounds={rounds}", "train.epochs=1", f"privacy.accountant={accountant}",
                             f"privacy.target_epsilon={epsilon}"])  # auto batch: its search picks the batch
    plan = plan_site(cfg, "site-0", examples)
    batch = resolve_train(cfg.train, examples, cfg.privacy, rounds).train.batch_size
    assert batch == plan.batch_size
    q = dp_sample_rate(examples, batch)
    assert planned_noise(cfg.privacy, q, plan.total_steps) == plan.noise_multiplier
    policy = SitePolicy(lifetime_epsilon=100.0, max_noise_multiplier=1e3)
    terms = run_terms(policy, PrivacyConfig(target_epsilon=epsilon, accountant=accountant), examples)
    granted, _, _ = round_noise(terms, policy, plan=None, run_rounds_done=0, run_history=[], prior=[], rounds=rounds,
                                steps=plan.steps_per_round, sample_rate=q, lifetime_delta=terms.delta)
    assert granted == pytest.approx(plan.noise_multiplier, rel=1e-9)


def test_plan_shows_the_class_balance_the_coordinator_will_send(tmp_path, capsys):
    from fedtune import tiny

    train = tiny.write_csv(tiny.separable_rows(200, seed=1, pos_share=0.5), tmp_path / "train.csv")
    skewed = tiny.write_csv(tiny.separable_rows(100, seed=2, pos_share=0.2), tmp_path / "skewed.csv")
    balanced = tiny.write_csv(tiny.separable_rows(100, seed=3, pos_share=0.5), tmp_path / "balanced.csv")
    data = [f'data.train="{train}"', "federation.sites=2"]

    def line(*sets: str, examples: bool = False) -> str:
        args = ["privacy", "plan", *(a for s in (*data, *sets) for a in ("--set", s))]
        assert main(args + (["--examples", "100,100"] if examples else [])) == 0
        return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("class balance"))

    got = line(f'data.eval="{skewed}"')
    assert got.startswith("class balance: reweighted, class prior [") and "coordinator's 100 evaluation rows" in got
    assert line(f'data.eval="{balanced}"') == "class balance: off (auto: the coordinator's 100 evaluation rows are balanced)"
    assert line(f'data.eval="{skewed}"', "train.class_balance=off") == "class balance: off"
    assert line(f'data.eval="{skewed}"', examples=True).startswith("class balance: auto (reweighted if")
    assert line(f'data.eval="{skewed}"', "train.class_balance=reweighted", "train.class_prior=[0.5, 0.5]") == (
        "class balance: reweighted, class prior [0.5, 0.5] as configured")
    assert line(f'data.eval="{skewed}"', "train.class_balance=reweighted", examples=True) == (
        "class balance: reweighted, class prior from the coordinator's evaluation rows when the run starts")
