"""Tiny randomly initialised models and a separable synthetic task, for tests and the tiny
modes of the benchmarks. Models are written with ``save_pretrained`` so that they are loaded
back through exactly the code path a real model takes."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# Two disjoint word sets make a task that a tiny random model can separate.
POSITIVE_WORDS = "bright calm clean fresh gentle happy kind lovely proud quick smart sunny sweet warm".split()
NEGATIVE_WORDS = "broken cold dirty dull grim harsh lazy loud muddy noisy rotten rude sour weak".split()
FILLER_WORDS = "the a this that it was is very quite really so and day room food team place".split()
VOCAB_WORDS = sorted(set(POSITIVE_WORDS + NEGATIVE_WORDS + FILLER_WORDS)) + [str(i) for i in range(10)] + [
    ".", ",", "?", "!", ":", "canary", "zq", "xv", "kw"
]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_tokenizer() -> BertTokenizerFast:
    words = _BERT_SPECIALS + VOCAB_WORDS
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def _gpt_tokenizer() -> PreTrainedTokenizerFast:
    # Like GPT-2's: an end-of-text token and no pad token (fedtune must add one).
    words = ["<|endoftext|>", "<unk>"] + VOCAB_WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<unk>"
    )


def _seeded() -> None:
    # Random weights, but the same ones every time: tests must not depend on luck.
    import torch

    torch.manual_seed(0)


def make_tiny_bert(folder: Path, hidden_size: int = 32) -> Path:
    """``hidden_size`` above 32: room to memorise (the privacy audit's canaries without DP)."""
    _seeded()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # Wider than BERT's 0.02 so that a random model's features differ between inputs
        # enough for DP training to find the signal in a few steps.
        initializer_range=0.2,
    )
    # With its pooler, as pretrained BERT checkpoints have one (a classifier reads it).
    BertModel(config, add_pooling_layer=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path) -> Path:
    _seeded()
    folder = Path(folder)
    tokenizer = _gpt_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path) -> Path:
    _seeded()
    folder = Path(folder)
    tokenizer = _gpt_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def separable_rows(n: int, seed: int = 0, signal: float = 0.5, pos_share: float | None = None) -> list[dict]:
    """Sentences labelled ``pos`` / ``neg`` by which word set they draw from.

    ``signal`` is the chance that a word (before the last, which always is) comes from the
    label's set rather than the filler words: higher is an easier task for a tiny model. The
    default 0.5 gives the rows that tests and benchmarks have always used. ``pos_share``: the
    chance of ``pos`` (skewed labels); None: an even choice."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choice(["pos", "neg"]) if pos_share is None else ("pos" if rng.random() < pos_share else "neg")
        words = POSITIVE_WORDS if label == "pos" else NEGATIVE_WORDS
        text = " ".join(
            rng.choice(words) if rng.random() < signal else rng.choice(FILLER_WORDS)
            for _ in range(rng.randint(4, 10))
        )
        text += f" {rng.choice(words)} {rng.randint(0, 9)} ."
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_bpe_vocab(texts: list[str], size: int = 400) -> tuple[list[str], list[str]]:
    """A byte-level BPE (GPT-2 style, as SmolLM2's) trained on ``texts``: tokens in id order (the
    three ChatML specials first, as SmolLM2 numbers them) and merges as "a b" strings."""
    import json

    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def make_tiny_gguf(folder: Path, quantize: bool = True) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer and a ChatML chat template, written as a GGUF
    file the way llama.cpp lays out SmolLM2's (the same metadata keys and tensor names; Q8_0 blocks
    with ``quantize``), so the GGUF load path is tested in seconds. Returns the file's path."""
    import gguf
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = separable_rows(300, seed=0)
    texts = [r["text"] for r in rows] + [f"{r['label']} ." for r in rows] + ["user assistant system"] * 20
    tokens, merges = _byte_bpe_vocab(texts)
    hidden, ffn, heads, kv_heads, layers = 64, 128, 2, 1, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    path = folder / "tiny-llama.Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fedtune tiny llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    def add(name: str, shape: tuple[int, ...], norm: bool = False) -> None:
        values = np.ones(shape, np.float32) if norm else rng.normal(0, 0.2, shape).astype(np.float32)
        if quantize and not norm:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_shape=None, raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)

    add("token_embd.weight", (len(tokens), hidden))  # tied: no output.weight, as in SmolLM2
    add("output_norm.weight", (hidden,), norm=True)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), norm=True)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), norm=True)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
