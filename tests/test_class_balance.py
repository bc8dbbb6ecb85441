"""train.class_balance: "reweighted" weights each example's clipped gradient by its class (the class-
weighted loss without DP), "logit-adjusted" makes the loss read logits + log(prior); the prior comes
from rows that cost no site privacy (the coordinator's evaluation rows, train-local's held-out rows)."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fedtune import tiny
from fedtune.config import ConfigError, load_config
from fedtune.evaluation import evaluate
from fedtune.local import prepare_site, run_train_local, with_local_class_prior
from fedtune.privacy.accounting import planned_noise
from fedtune.server.coordinator import prepare_run
from fedtune.training.auto import resolve_class_balance
from fedtune.training.losses import class_weights, label_prior, logit_adjustment
from fedtune.training.trainer import LocalTrainer, dp_sample_rate, steps_per_epoch
from tests.helpers import tiny_config


def _smoothed(counts: dict, labels: list[str]) -> list[float]:
    total = sum(counts.get(k, 0) + 1 for k in labels)
    return [(counts.get(k, 0) + 1) / total for k in labels]


def test_label_prior_is_the_add_one_smoothed_frequency():
    assert label_prior([0, 0, 0, 1], 2) == [4 / 6, 2 / 6]
    assert label_prior([1, 1], 3) == [1 / 5, 3 / 5, 1 / 5]  # an absent class keeps a finite log-prior
    assert torch.allclose(logit_adjustment([0.2, 0.8], 2), torch.log(torch.tensor([0.2, 0.8])))
    with pytest.raises(ValueError, match="3 values for 2 labels"):
        logit_adjustment([0.2, 0.3, 0.5], 2)
    # reweighted: the smallest prior over each class's, so no weight exceeds 1 (no privacy cost)
    assert torch.allclose(class_weights([0.2, 0.5, 0.3], 3), torch.tensor([1.0, 0.4, 2 / 3]))
    with pytest.raises(ValueError, match="3 values for 2 labels"):
        class_weights([0.2, 0.3, 0.5], 2)


@pytest.mark.parametrize("balance, task, counts, want", [
    ("auto", "sequence-classification", [60, 40], "off"),              # 1.5x after smoothing: 61/41 < 1.5
    ("auto", "sequence-classification", [70, 30], "reweighted"),
    ("auto", "sequence-classification", [25, 25, 25, 25], "off"),
    ("auto", "causal-lm", [90, 10], "off"),
    ("off", "sequence-classification", [90, 10], "off"),
    ("logit-adjusted", "sequence-classification", [50, 50], "logit-adjusted"),
    ("reweighted", "sequence-classification", [50, 50], "reweighted"),
])
def test_auto_adjusts_only_a_skewed_prior(balance, task, counts, want):
    train = load_config(None, [f"train.class_balance={balance}"]).train
    ids = [i for i, c in enumerate(counts) for _ in range(c)]
    got = resolve_class_balance(train, task, ids, len(counts))
    assert got.class_balance == want
    assert got.class_prior == (pytest.approx(label_prior(ids, len(counts)), abs=1e-6) if want != "off" else [])


def test_the_prior_must_be_positive():
    with pytest.raises(ConfigError, match="class_prior"):
        load_config(None, ["train.class_prior=[0.5, 0.0]"])


@pytest.mark.parametrize("balance", ["off", "logit-adjusted"])
def test_the_training_loss_adds_the_log_prior_to_the_logits(tiny_models, separable_files, balance):
    prior = [0.8, 0.2]
    cfg = tiny_config(tiny_models["bert"], separable_files["train"],
                      overrides=[f"train.class_balance={balance}", f"train.class_prior={prior}"])
    site = prepare_site(cfg)
    trainer = LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                           site.device, "fp32", noise_multiplier=0.0)
    input_ids, mask, labels = site.collate([site.data.train[i] for i in range(8)])
    got = float(trainer.loss(input_ids, mask, labels))
    with torch.no_grad():
        logits = trainer.model(input_ids=input_ids, attention_mask=mask).logits.float()
    shift = torch.log(torch.tensor(prior)) if balance == "logit-adjusted" else torch.zeros(2)
    assert got == pytest.approx(float(F.cross_entropy(logits + shift, labels)), rel=1e-5)
    if balance == "logit-adjusted":
        assert got != pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-3)
    trainer.close()


def test_without_dp_reweighted_is_the_class_weighted_loss(tiny_models, separable_files):
    # (With DP the weights multiply the clipped per-example gradients: tests/test_dp_training.py.)
    prior = [0.8, 0.2]
    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=[
        "privacy.enabled=false", "train.class_balance=reweighted", f"train.class_prior={prior}"])
    site = prepare_site(cfg)
    trainer = LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                           site.device, "fp32")
    input_ids, mask, labels = site.collate([site.data.train[i] for i in range(8)])
    assert 0 < int(labels.sum()) < 8, "test needs both classes in the batch"
    got = float(trainer.loss(input_ids, mask, labels))
    with torch.no_grad():
        logits = trainer.model(input_ids=input_ids, attention_mask=mask).logits.float()
    weights = torch.tensor([0.25, 1.0])[labels]
    assert got == pytest.approx(float((F.cross_entropy(logits, labels, reduction="none") * weights).mean()), rel=1e-5)
    assert got != pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-3)
    trainer.close()


@pytest.mark.parametrize("balance", ["logit-adjusted", "reweighted"])
def test_class_balance_without_a_prior_is_refused(tiny_models, separable_files, balance):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=[f"train.class_balance={balance}"])
    site = prepare_site(cfg)
    with pytest.raises(ValueError, match="needs train.class_prior"):
        LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                     site.device, "fp32", noise_multiplier=1.0)


def test_the_coordinator_takes_the_prior_from_its_own_evaluation_rows(tiny_models, tmp_path):
    # The sites hold mostly "pos", the coordinator's evaluation rows mostly "neg": the prior sent to
    # the sites is the coordinator's (no site's training counts leave it).
    train = tiny.write_csv(tiny.separable_rows(300, seed=1, pos_share=0.9), tmp_path / "train.csv")
    held_rows = tiny.separable_rows(100, seed=2, pos_share=0.25)
    held = tiny.write_csv(held_rows, tmp_path / "eval.csv")
    cfg = load_config(None, [f'model.name="{tiny_models["bert"]}"', "model.max_length=24", f'data.train="{train}"',
                             f'data.eval="{held}"', "federation.sites=3", "train.class_balance=logit-adjusted"])
    run = prepare_run(cfg, tmp_path / "run")
    labels = run.cfg.data.labels
    assert run.cfg.train.class_prior == pytest.approx(_smoothed(Counter(r["label"] for r in held_rows), labels), abs=1e-6)
    # Off: nothing is filled in. Auto: reweighted here (the coordinator's rows are skewed), not on balanced rows.
    for balance, rows, want in (("off", held_rows, "off"), ("auto", held_rows, "reweighted"),
                                ("auto", tiny.separable_rows(100, seed=2, pos_share=0.5), "off")):
        other = tiny.write_csv(rows, tmp_path / f"eval-{balance}-{want}.csv")
        run = prepare_run(cfg.model_copy(update={
            "train": cfg.train.model_copy(update={"class_balance": balance}),
            "data": cfg.data.model_copy(update={"eval": other})}), tmp_path / f"{balance}-{want}")
        assert run.cfg.train.class_balance == want
        assert (run.cfg.train.class_prior != []) == (want != "off")


def test_train_local_takes_the_prior_from_its_held_out_rows(tiny_models, tmp_path):
    train_rows = tiny.separable_rows(200, seed=1, pos_share=0.9)
    eval_rows = tiny.separable_rows(60, seed=2, pos_share=0.5)
    cfg = tiny_config(tiny_models["bert"], tiny.write_csv(train_rows, tmp_path / "train.csv"),
                      tiny.write_csv(eval_rows, tmp_path / "eval.csv"),
                      overrides=["train.class_balance=logit-adjusted", "train.epochs=1"])
    run_train_local(cfg, tmp_path / "out")
    saved = load_config(tmp_path / "out" / "config.toml")
    assert saved.train.class_prior == pytest.approx(
        _smoothed(Counter(r["label"] for r in eval_rows), ["neg", "pos"]), abs=1e-6)
    assert not math.isclose(saved.train.class_prior[1], 0.9, abs_tol=0.2)  # not the training rows' share


@pytest.mark.slow
def test_a_skewed_task_under_dp_predicts_more_than_the_majority_class(tiny_models, tmp_path):
    # 10% "pos" rows, DP at epsilon 8: plain cross-entropy answers "neg" for every row (measured:
    # macro-F1 0.47, the majority class's), the reweighted clipped gradients answer both classes
    # (0.74; a balanced objective gives up some majority-class accuracy: 0.85 against 0.90). Fixed
    # sampling and noise secrets: the test must not depend on luck.
    train = tiny.write_csv(tiny.separable_rows(2048, seed=1, signal=0.9, pos_share=0.1), tmp_path / "train.csv")
    held = tiny.write_csv(tiny.separable_rows(400, seed=2, signal=0.9, pos_share=0.1), tmp_path / "eval.csv")
    scores = {}
    for balance in ("off", "reweighted"):
        cfg = tiny_config(tiny_models["bert"], train, held, overrides=[
            "train.batch_size=512", "train.physical_batch_size=512", "train.epochs=10", "train.learning_rate=2e-2",
            "privacy.target_epsilon=8", "lora.r=8", f"train.class_balance={balance}"])
        site = prepare_site(cfg)
        cfg = cfg.model_copy(update={"train": with_local_class_prior(cfg.train, site)})
        n = len(site.data.train)
        steps = cfg.train.epochs * steps_per_epoch(n, cfg.train.batch_size)
        trainer = LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                               site.device, "fp32",
                               noise_multiplier=planned_noise(cfg.privacy, dp_sample_rate(n, cfg.train.batch_size), steps),
                               sample_seed=2, noise_seed=1)
        result = trainer.train(steps)
        assert result.epsilon(1e-5) <= 8.0
        scores[balance] = evaluate(trainer.close(), site.data.eval, site.collate, cfg.model.task, site.device)
    off, balanced = scores["off"], scores["reweighted"]
    majority_f1 = (2 * 0.9 / 1.9) / 2  # about: the eval rows are 10% "pos" too
    assert off["predicted_classes"] == 1 and off["f1"] == pytest.approx(majority_f1, abs=0.03), off
    assert balanced["predicted_classes"] == 2 and balanced["f1"] >= off["f1"] + 0.2, balanced
    assert balanced["accuracy"] >= 0.8, (off, balanced)
