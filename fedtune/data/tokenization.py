"""Tokenize rows into unpadded examples; pad per batch in ``pad_collate``.

Examples keep their own length so a batch is only padded to its longest member, which
matters for DP-SGD where per-example gradients make every padded position expensive.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # the label value Hugging Face losses skip


class TokenizedDataset(Dataset):
    """Items are ``(input_ids, attention_mask, labels)`` 1-D long tensors (labels 0-d for
    classification). ``rows`` are the source row numbers; ``dropped`` counts examples left out."""

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: list[list[int]] | list[int],
        rows: Optional[Sequence[int]] = None,
        dropped: int = 0,
    ):
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} examples but {len(labels)} labels")
        self.input_ids = input_ids
        self.labels = labels
        self.rows = list(rows) if rows is not None else list(range(1, len(input_ids) + 1))
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.tensor(self.input_ids[i], dtype=torch.long)
        return ids, torch.ones_like(ids), torch.tensor(self.labels[i], dtype=torch.long)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def _tokenize(tokenizer, texts: Sequence[str], max_length: int, special: bool = True) -> list[list[int]]:
    if not texts:  # some tokenizers reject an empty batch
        return []
    # One batched call (Rust, parallel); skip the masks and type ids we rebuild or never use.
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        add_special_tokens=special,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


def encode_classification(texts, label_ids, tokenizer, max_length: int, rows=None) -> TokenizedDataset:
    return TokenizedDataset(_tokenize(tokenizer, list(texts), max_length), list(label_ids), rows)


def encode_causal(texts, tokenizer, max_length: int, rows=None) -> TokenizedDataset:
    eos = getattr(tokenizer, "eos_token_id", None)
    rows = list(rows) if rows is not None else list(range(1, len(texts) + 1))
    kept_ids, kept_rows = [], []
    for ids, row in zip(_tokenize(tokenizer, list(texts), max_length), rows):
        # EOS teaches the model where a text ends; skip it when the text was cut at max_length.
        if eos is not None and len(ids) < max_length and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if len(ids) >= 2:  # a single token has no next token to predict
            kept_ids.append(ids)
            kept_rows.append(row)
    return TokenizedDataset(kept_ids, kept_ids, kept_rows, dropped=len(rows) - len(kept_ids))


def encode_prompt_response(prompts, responses, tokenizer, max_length: int, rows=None) -> TokenizedDataset:
    """Prompt then response (+EOS); the loss is on the response only (prompt labels = -100)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if eos is not None else []
    # Tokenized separately so the prompt/response boundary is exact.
    p_ids = _tokenize(tokenizer, list(prompts), max_length)
    r_ids = _tokenize(tokenizer, list(responses), max_length, special=False)
    rows = list(rows) if rows is not None else list(range(1, len(p_ids) + 1))
    kept_ids, kept_labels, kept_rows = [], [], []
    for p, r, row in zip(p_ids, r_ids, rows):
        ids = (p + r + tail)[:max_length]  # keep the prompt start, cut the end
        labels = ([IGNORE_INDEX] * len(p) + r + tail)[:max_length]
        if len(ids) > len(p):  # the response was truncated away entirely: nothing to learn
            kept_ids.append(ids)
            kept_labels.append(labels)
            kept_rows.append(row)
    return TokenizedDataset(kept_ids, kept_labels, kept_rows, dropped=len(rows) - len(kept_ids))


def pad_collate(pad_token_id: int) -> Callable[[list], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-pad a batch to its longest item: attention 0 and label -100 on padding."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
    pad_token_id = int(pad_token_id)

    def collate(batch):
        if not batch:
            raise ValueError("pad_collate got an empty batch")
        ids, masks, labels = zip(*batch)
        input_ids = pad_sequence(list(ids), batch_first=True, padding_value=pad_token_id)
        attention = pad_sequence(list(masks), batch_first=True, padding_value=0)
        if labels[0].dim() == 0:
            out_labels = torch.stack(labels)
        else:
            out_labels = pad_sequence(list(labels), batch_first=True, padding_value=IGNORE_INDEX)
        return input_ids, attention, out_labels

    return collate
