import numpy as np
import pytest
import torch
from peft import PeftModel

from fedtune.adapters import (AdapterMismatchError, get_adapter_arrays, pack, set_adapter_arrays, trainable_parameters,
                              unpack)
from fedtune.local import prepare_site, save_adapter
from fedtune.model import ModelLoadError, default_target_modules, load_base_model, load_tokenizer
from fedtune.training.trainer import LocalTrainer
from tests.helpers import tiny_config


@pytest.mark.parametrize("arch, task", [("bert", "sequence-classification"), ("gpt2", "sequence-classification"),
                                        ("gpt2", "causal-lm"), ("llama", "causal-lm"), ("llama", "sequence-classification")])
def test_lora_on_each_architecture(tiny_models, separable_files, arch, task):
    cfg = tiny_config(tiny_models[arch], separable_files["train"], separable_files["eval"], task,
                      ["lora.freeze_a=false"])  # plain LoRA (A trained); FFA-LoRA: tests/test_ffa_lora.py
    site = prepare_site(cfg)
    names = list(trainable_parameters(site.model))
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    targets = default_target_modules(site.model.config.model_type)
    assert all(any(t in n for t in targets) for n in names if "lora_" in n)
    head = [n for n in names if "lora_" not in n]
    if task == "sequence-classification":
        assert head, "the classification head must be trainable"
    else:
        assert not head
    frozen = [p for n, p in site.model.named_parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for p in frozen)


@pytest.mark.parametrize("arch, task", [("bert", "sequence-classification"), ("gpt2", "causal-lm"),
                                        ("llama", "causal-lm")])
def test_top_layers_puts_lora_in_the_last_blocks_only(tiny_models, separable_files, arch, task):
    full = prepare_site(tiny_config(tiny_models[arch], separable_files["train"], task=task))
    total = full.model.config.num_hidden_layers
    assert total >= 2

    def lora_blocks(model) -> set[int]:
        return {int(part) for n in trainable_parameters(model) if "lora_" in n
                for part in n.split(".") if part.isdigit()}

    assert lora_blocks(full.model) == set(range(total))
    top = prepare_site(tiny_config(tiny_models[arch], separable_files["train"], task=task, overrides=["lora.top_layers=1"]))
    assert lora_blocks(top.model) == {total - 1}
    with pytest.raises(ModelLoadError, match=f"lora.top_layers = {total + 1}.*has {total} layers"):
        prepare_site(tiny_config(tiny_models[arch], separable_files["train"], task=task,
                                 overrides=[f"lora.top_layers={total + 1}"]))


def test_head_only_trains_and_sends_the_classification_head_alone(tiny_models, separable_files):
    site = prepare_site(tiny_config(tiny_models["bert"], separable_files["train"], overrides=["lora.head_only=true"]))
    names = list(trainable_parameters(site.model))
    assert names and not any("lora_" in n for n in names) and all("classifier" in n or "score" in n for n in names)
    assert set(get_adapter_arrays(site.model)) == set(names)  # what a site sends: the head alone
    with pytest.raises(ModelLoadError, match="lora.head_only"):
        prepare_site(tiny_config(tiny_models["gpt2"], separable_files["train"], task="causal-lm",
                                 overrides=["lora.head_only=true"]))


def test_gpt_style_tokenizer_gets_a_pad_token(tiny_models):
    cfg = tiny_config(tiny_models["gpt2"])
    tok = load_tokenizer(cfg.model)
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "missing-model")
    with pytest.raises(ModelLoadError, match="missing-model"):
        load_tokenizer(cfg.model)


def test_bad_target_modules_are_a_clear_error(tiny_models, separable_files):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"], overrides=['lora.target_modules=["nonexistent_proj"]'])
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        prepare_site(cfg)


def test_adapter_arrays_round_trip_exactly(tiny_models, separable_files):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"])
    site = prepare_site(cfg)
    arrays = get_adapter_arrays(site.model)
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in arrays.items()}
    set_adapter_arrays(site.model, new)
    back = get_adapter_arrays(site.model)
    assert list(back) == list(arrays)
    for k in new:
        assert np.array_equal(back[k], new[k])


def test_adapter_arrays_load_into_an_opacus_wrapped_model(tiny_models, separable_files):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"])
    site = prepare_site(cfg)
    params_before = list(trainable_parameters(site.model).values())
    trainer = LocalTrainer(site.model, site.data.train, site.collate, cfg.model.task, cfg.train, cfg.privacy,
                           site.device, "fp32", noise_multiplier=1.0)
    arrays = {k: np.full(v.shape, 0.25, np.float32) for k, v in get_adapter_arrays(trainer.model).items()}
    set_adapter_arrays(trainer.model, arrays)
    got = get_adapter_arrays(trainer.model)
    assert all(np.all(v == 0.25) for v in got.values())
    # loaded in place: the same Parameter objects the optimizer and hooks hold
    assert [id(p) for p in trainable_parameters(trainer.model).values()] == [id(p) for p in params_before]
    trainer.close()


def test_adapter_name_and_shape_mismatch_are_errors(tiny_models, separable_files):
    cfg = tiny_config(tiny_models["bert"], separable_files["train"])
    site = prepare_site(cfg)
    arrays = get_adapter_arrays(site.model)
    missing = dict(list(arrays.items())[1:])
    with pytest.raises(AdapterMismatchError, match="missing"):
        set_adapter_arrays(site.model, missing)
    extra = {**arrays, "bogus.weight": np.zeros(3, np.float32)}
    with pytest.raises(AdapterMismatchError, match="bogus.weight"):
        set_adapter_arrays(site.model, extra)
    name = next(iter(arrays))
    wrong = {**arrays, name: np.zeros((1, 1), np.float32)}
    with pytest.raises(AdapterMismatchError, match="shape"):
        set_adapter_arrays(site.model, wrong)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_packed_adapter_is_one_flat_array_that_unpacks_to_the_same_tensors(dtype):
    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=s).astype(dtype) for s in [(8, 4), (4, 8), (2, 8), (2,), (1, 1, 3)]]
    [packed] = pack(tensors)
    assert packed.ndim == 1 and packed.size == sum(t.size for t in tensors) and packed.dtype == dtype
    back = unpack([packed], [t.shape for t in tensors])
    for t, b in zip(tensors, back, strict=True):
        np.testing.assert_array_equal(t, b)


@pytest.mark.parametrize("wire, why", [
    (lambda ts: ts, "the tensors unpacked"),
    (lambda ts: [np.concatenate([t.ravel() for t in ts])[:-1]], "one value short"),
    (lambda ts: [np.concatenate([t.ravel() for t in ts]).reshape(2, -1)], "not flat"),
    (lambda ts: [], "nothing"),
])
def test_anything_but_the_packed_adapter_is_an_error_naming_the_expected_size(wire, why):
    tensors = [np.zeros((4, 2), np.float32), np.zeros(2, np.float32)]
    with pytest.raises(AdapterMismatchError, match="one flat array of 10 values"):
        unpack(wire(tensors), [t.shape for t in tensors])


@pytest.mark.parametrize("arch, task", [("bert", "sequence-classification"), ("gpt2", "causal-lm")])
def test_saved_adapter_loads_with_peft_and_gives_identical_logits(tiny_models, separable_files, tmp_path, arch, task):
    cfg = tiny_config(tiny_models[arch], separable_files["train"], task=task, overrides=["privacy.enabled=false"])
    site = prepare_site(cfg)
    trainer = LocalTrainer(site.model, site.data.train, site.collate, task, cfg.train, cfg.privacy, site.device, "fp32")
    trainer.train(3)
    model = trainer.close().eval()
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    tok = load_tokenizer(cfg.model)
    id2label = dict(enumerate(site.label_map.labels)) if site.label_map else None
    base = load_base_model(cfg.model, tok, id2label, seed=123)  # different seed: the head must come from the file
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = site.collate([site.data.train[i] for i in range(8)])
    with torch.no_grad():
        want = model(input_ids=batch[0], attention_mask=batch[1]).logits
        got = loaded(input_ids=batch[0], attention_mask=batch[1]).logits
    assert torch.equal(want, got)


def test_mean_pooling_head_reads_the_masked_mean_of_the_last_hidden_states(tiny_models, separable_files):
    from fedtune.model import MaskedMeanPooler

    cfg = tiny_config(tiny_models["bert"], separable_files["train"])
    assert cfg.model.pooling == "auto"
    site = prepare_site(cfg)
    model = site.model.eval()
    bert = model.base_model.model.bert
    assert isinstance(bert.pooler, MaskedMeanPooler)
    ids, mask, _ = site.collate([site.data.train[i] for i in range(4)])
    # Extra padding (masked out) must not change the logits: the mean is over real tokens only.
    pad = torch.full((ids.shape[0], 5), site.model.config.pad_token_id, dtype=ids.dtype)
    ids_padded, mask_padded = torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits_padded = model(input_ids=ids_padded, attention_mask=mask_padded).logits
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        by_hand = model.base_model.model.classifier((hidden * m).sum(1) / m.sum(1))
    torch.testing.assert_close(logits, logits_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)


def test_pooling_cls_keeps_the_architectures_pooler_and_mean_needs_one(tiny_models, separable_files):
    from transformers.models.bert.modeling_bert import BertPooler

    site = prepare_site(tiny_config(tiny_models["bert"], separable_files["train"], overrides=["model.pooling=cls"]))
    assert isinstance(site.model.base_model.model.bert.pooler, BertPooler)
    # auto on an architecture without a pooler (GPT-2 reads its last token): its own head.
    prepare_site(tiny_config(tiny_models["gpt2"], separable_files["train"]))
    with pytest.raises(ModelLoadError, match="model.pooling = 'mean'"):
        prepare_site(tiny_config(tiny_models["gpt2"], separable_files["train"], overrides=["model.pooling=mean"]))
