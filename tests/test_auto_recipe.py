"""train.batch_size / learning_rate = "auto", the noise-to-signal shown by `fedtune privacy plan`,
and the warning for a site too small to learn under DP."""

import math

import pytest

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.privacy.accounting import calibrate_noise_multiplier
from fedtune.privacy.plan import MAX_NOISE_TO_SIGNAL, plan_site
from fedtune.training.auto import (
    DP_LEARNING_RATE,
    NON_PRIVATE_LEARNING_RATE,
    TARGET_NOISE_TO_SIGNAL,
    batch_ladder,
    resolve_train,
)
from fedtune.training.trainer import LocalTrainer, dp_sample_rate, steps_per_epoch

RDP = ["privacy.accountant=rdp", "federation.rounds=3", "train.epochs=1"]


def _sigma(cfg, n, b):
    return calibrate_noise_multiplier(cfg.privacy.target_epsilon, cfg.privacy.target_delta, dp_sample_rate(n, b),
                                      3 * steps_per_epoch(n, b), "rdp")


def test_explicit_numbers_are_kept():
    cfg = load_config(None, RDP + ["train.batch_size=48", "train.learning_rate=3e-3"])
    resolved = resolve_train(cfg.train, 5000, cfg.privacy, 3)
    assert (resolved.train.batch_size, resolved.train.learning_rate) == (48, 3e-3)
    assert not resolved.batch_auto and not resolved.learning_rate_auto


@pytest.mark.parametrize("n", [300, 4000])
def test_auto_batch_is_the_smallest_on_the_ladder_under_the_noise_to_signal_target(n):
    cfg = load_config(None, RDP)
    assert cfg.train.batch_size == "auto" and cfg.train.learning_rate == "auto"
    resolved = resolve_train(cfg.train, n, cfg.privacy, 3)
    b = resolved.train.batch_size
    assert resolved.batch_auto and resolved.train.learning_rate == DP_LEARNING_RATE
    ladder = batch_ladder(n)
    assert ladder[0] >= 2 * math.sqrt(n) and b in ladder
    assert _sigma(cfg, n, b) / b <= TARGET_NOISE_TO_SIGNAL
    smaller = [x for x in ladder if x < b]
    assert all(_sigma(cfg, n, x) / x > TARGET_NOISE_TO_SIGNAL for x in smaller)


def test_auto_takes_larger_batches_for_smaller_sites_budgets_and_none_without_dp():
    cfg = load_config(None, RDP)
    big = resolve_train(cfg.train, 4000, cfg.privacy, 3).train.batch_size
    assert big == batch_ladder(4000)[0]  # a large site: about 2 sqrt(N)
    tight = cfg.privacy.model_copy(update={"target_epsilon": 1.0})
    assert resolve_train(cfg.train, 4000, tight, 3).train.batch_size > big
    off = resolve_train(cfg.train, 4000, cfg.privacy.model_copy(update={"enabled": False}), 3).train
    assert (off.batch_size, off.learning_rate) == (32, NON_PRIVATE_LEARNING_RATE)


def test_trainer_refuses_an_unresolved_auto(tiny_models, separable_files):
    from fedtune.local import prepare_site
    from tests.helpers import tiny_config

    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=['train.batch_size="auto"', 'train.learning_rate="auto"'])
    site = prepare_site(cfg)
    with pytest.raises(ValueError, match="resolved for the site"):
        LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                     site.device, "fp32")


def test_plan_shows_auto_and_noise_to_signal_and_warns_a_site_too_small():
    cfg = load_config(None, RDP)
    large = plan_site(cfg, "site-0", 4000)
    assert large.batch_auto and large.learning_rate_auto and large.warnings == []
    assert large.noise_to_signal == pytest.approx(large.noise_multiplier / large.batch_size)
    small = plan_site(cfg, "site-1", 8)
    assert small.noise_to_signal > MAX_NOISE_TO_SIGNAL
    (warning,) = small.warnings
    for advice in ("more rows", "fewer rounds", "a larger epsilon"):
        assert advice in warning
    # The defaults are already FFA-LoRA at rank 4: advice only for what the config can still change.
    assert "FFA-LoRA" not in warning and "smaller LoRA rank" not in warning
    # What auto already did (every row in each step) and the class balance a skewed task needs.
    assert 'train.batch_size = "auto" already takes every row (8) in each step' in warning
    assert "class_balance" not in warning  # the default ("auto") already balances skewed labels
    (unbalanced,) = plan_site(load_config(None, RDP + ["train.class_balance=off"]), "site-1", 8).warnings
    assert 'train.class_balance = "reweighted"' in unbalanced
    (plain,) = plan_site(load_config(None, RDP + ["lora.freeze_a=false", "lora.r=8"]), "site-1", 8).warnings
    assert "FFA-LoRA" in plain and "smaller LoRA rank (lora.r = 8)" in plain


def test_privacy_plan_command_prints_auto_choices_and_the_warning(capsys):
    assert main(["privacy", "plan", "--examples", "8,4000", *[a for s in RDP for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "(auto)" in out and "noise/signal" in out
    assert "WARNING site-0: too little signal" in out and "WARNING site-1" not in out
