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


def separable_rows(n: int, seed: int = 0, signal: float = 0.5) -> list[dict]:
    """Sentences labelled ``pos`` / ``neg`` by which word set they draw from.

    ``signal`` is the chance that a word (before the last, which always is) comes from the
    label's set rather than the filler words: higher is an easier task for a tiny model. The
    default 0.5 gives the rows that tests and benchmarks have always used."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choice(["pos", "neg"])
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
