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
