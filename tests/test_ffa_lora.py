"""FFA-LoRA: a shared, seeded, frozen A; only B and the head are trained and sent."""

import math

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedtune.adapters import get_adapter_arrays, trainable_parameters
from fedtune.local import prepare_site, save_adapter
from fedtune.model import ModelLoadError, load_base_model, load_tokenizer
from fedtune.training.trainer import LocalTrainer
from tests.helpers import tiny_config

FFA = ["lora.freeze_a=true"]      # the default, stated where a test is about it
PLAIN = ["lora.freeze_a=false"]   # LoRA with A trained too


def _a_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def _site(tiny_models, files, arch="bert", task="sequence-classification", overrides=()):
    return prepare_site(tiny_config(tiny_models[arch], files["train"], task=task, overrides=list(overrides)))


@pytest.mark.parametrize("arch, task", [("bert", "sequence-classification"), ("gpt2", "causal-lm"),
                                        ("llama", "sequence-classification")])
def test_only_b_and_head_are_trainable(tiny_models, separable_files, arch, task):
    plain = _site(tiny_models, separable_files, arch, task, PLAIN).model
    ffa = _site(tiny_models, separable_files, arch, task, FFA).model
    names = list(trainable_parameters(ffa))
    all_b = [n for n, _ in ffa.named_parameters() if "lora_B" in n]
    assert all_b and set(all_b) <= set(names)
    assert not any("lora_A" in n for n in names)
    assert all(not p.requires_grad for n, p in ffa.named_parameters() if "lora_A" in n)
    # Exactly plain LoRA's trainable set minus A: B and (for classification) the head.
    assert {n for n in trainable_parameters(plain) if "lora_A" not in n} == set(names)
    if task == "sequence-classification":
        assert any("lora_" not in n for n in names), "the classification head must stay trainable"
    n_plain = sum(p.numel() for p in trainable_parameters(plain).values())
    n_ffa = sum(p.numel() for p in trainable_parameters(ffa).values())
    print(f"{arch}/{task}: FFA-LoRA trains {n_ffa} of plain LoRA's {n_plain} parameters ({n_ffa / n_plain:.3f})")
    assert n_ffa < n_plain


def test_a_is_identical_across_parties_and_set_by_a_seed(tiny_models, separable_files):
    # train.seed seeds the global RNG before the head is drawn: A must not depend on it.
    one = _a_tensors(_site(tiny_models, separable_files, overrides=FFA + ["train.seed=1"]).model)
    torch.manual_seed(12345)  # nor on the global RNG state when the model is built
    two = _a_tensors(_site(tiny_models, separable_files, overrides=FFA + ["train.seed=2"]).model)
    other = _a_tensors(_site(tiny_models, separable_files, overrides=FFA + ["train.seed=1", "lora.a_seed=7"]).model)
    assert one and list(one) == list(two)
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert all(not torch.equal(one[n], other[n]) for n in one)
    # Plain LoRA's A, by contrast, follows the global RNG (so it would differ between parties).
    p1 = _a_tensors(_site(tiny_models, separable_files, overrides=PLAIN + ["train.seed=1"]).model)
    p2 = _a_tensors(_site(tiny_models, separable_files, overrides=PLAIN + ["train.seed=2"]).model)
    assert any(not torch.equal(p1[n], p2[n]) for n in p1)


def test_a_has_peft_kaiming_uniform_distribution(tiny_models, separable_files):
    model = _site(tiny_models, separable_files, overrides=FFA).model
    for name, a in _a_tensors(model).items():
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming-uniform, a=sqrt(5)
        assert float(a.abs().max()) <= bound, name
        assert float(a.abs().max()) > 0.8 * bound, name  # spread over the range, not tiny
        assert abs(float(a.mean())) < 0.25 * bound, name


def test_a_stays_bit_identical_through_dp_training_and_b_moves(tiny_models, separable_files):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=FFA + ["train.learning_rate=1e-2"])
    site = prepare_site(cfg)
    a_before = _a_tensors(site.model)
    sent_before = get_adapter_arrays(site.model)
    assert not any("lora_A" in n for n in sent_before)  # A is never sent
    trainer = LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                           site.device, "fp32", noise_multiplier=1.0)
    result = trainer.train(3)
    model = trainer.close()
    assert result.steps == 3
    a_after = _a_tensors(model)
    assert list(a_after) == list(a_before)
    assert all(torch.equal(a_before[n], a_after[n]) for n in a_before)
    sent_after = get_adapter_arrays(model)
    assert list(sent_after) == list(sent_before)
    assert all(not np.array_equal(sent_before[n], sent_after[n]) for n in sent_before)  # every B and the head


@pytest.mark.parametrize("arch, task", [("bert", "sequence-classification"), ("gpt2", "causal-lm")])
def test_saved_ffa_adapter_loads_with_peft_and_gives_identical_logits(tiny_models, separable_files, tmp_path,
                                                                      arch, task):
    cfg = tiny_config(tiny_models[arch], separable_files["train"], task=task,
                      overrides=FFA + ["lora.a_seed=3", "train.learning_rate=1e-2"])
    site = prepare_site(cfg)
    trainer = LocalTrainer(site.model, site.data.train, site.collate, task, cfg.train, cfg.privacy,
                           site.device, "fp32", noise_multiplier=1.0)
    trainer.train(2)
    model = trainer.close().eval()
    save_adapter(model, tmp_path / "adapter")

    tok = load_tokenizer(cfg.model)
    id2label = dict(enumerate(site.label_map.labels)) if site.label_map else None
    base = load_base_model(cfg.model, tok, id2label, seed=5)  # different seed: A and the head come from the file
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    loaded_a = _a_tensors(loaded)
    assert loaded_a and all(torch.equal(loaded_a[n], a) for n, a in _a_tensors(model).items())
    batch = site.collate([site.data.train[i] for i in range(8)])
    with torch.no_grad():
        want = model(input_ids=batch[0], attention_mask=batch[1]).logits
        got = loaded(input_ids=batch[0], attention_mask=batch[1]).logits
    assert torch.equal(want, got)


def test_freeze_a_on_embedding_lora_is_a_clear_error(tiny_models, separable_files):
    with pytest.raises(ModelLoadError, match="embedding"):
        _site(tiny_models, separable_files, "gpt2", "causal-lm", FFA + ['lora.target_modules=["c_attn", "wte"]'])
