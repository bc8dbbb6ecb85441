"""FFA-LoRA: a shared, seeded, frozen A; only B and the head are trained and sent."""

import numpy as np
import torch
from peft import PeftModel

from fedtune.adapters import get_adapter_arrays, trainable_parameters
from fedtune.local import prepare_site, save_adapter
from fedtune.model import load_base_model, load_tokenizer
from fedtune.training.trainer import LocalTrainer
from tests.helpers import tiny_config


def _a_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_only_b_and_head_are_trainable(tiny_models, separable_files):
    plain = prepare_site(tiny_config(tiny_models["bert"], separable_files["train"])).model
    ffa = prepare_site(tiny_config(tiny_models["bert"], separable_files["train"], overrides=["lora.freeze_a=true"])).model
    names = list(trainable_parameters(ffa))
    assert not any("lora_A" in n for n in names)
    assert {n for n in trainable_parameters(plain) if "lora_A" not in n} == set(names)
    n_plain = sum(p.numel() for p in trainable_parameters(plain).values())
    n_ffa = sum(p.numel() for p in trainable_parameters(ffa).values())
    assert n_ffa < n_plain


def test_a_is_identical_across_parties_and_set_by_a_seed(tiny_models, separable_files):
    f = separable_files["train"]
    one = _a_tensors(prepare_site(tiny_config(tiny_models["bert"], f, overrides=["lora.freeze_a=true", "train.seed=1"])).model)
    two = _a_tensors(prepare_site(tiny_config(tiny_models["bert"], f, overrides=["lora.freeze_a=true", "train.seed=2"])).model)
    other = _a_tensors(prepare_site(tiny_config(tiny_models["bert"], f, overrides=["lora.freeze_a=true", "lora.a_seed=7"])).model)
    assert one and all(torch.equal(one[n], two[n]) for n in one)
    assert all(not torch.equal(one[n], other[n]) for n in one)


def test_a_stays_bit_identical_through_dp_training(tiny_models, separable_files, tmp_path):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=["lora.freeze_a=true",
                                                                                "train.learning_rate=1e-2"])
    site = prepare_site(cfg)
    a_before = _a_tensors(site.model)
    b_before = get_adapter_arrays(site.model)
    trainer = LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                           site.device, "fp32", noise_multiplier=1.0)
    trainer.train(3)
    model = trainer.close().eval()
    a_after = _a_tensors(model)
    assert all(torch.equal(a_before[n], a_after[n]) for n in a_before)
    b_after = get_adapter_arrays(model)
    assert all(not np.array_equal(b_before[n], b_after[n]) for n in b_before)

    save_adapter(model, tmp_path / "adapter")
    tok = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, tok, dict(enumerate(site.label_map.labels)), seed=5)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = site.collate([site.data.train[i] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch[0], attention_mask=batch[1]).logits,
                           loaded(input_ids=batch[0], attention_mask=batch[1]).logits)
