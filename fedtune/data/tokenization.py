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
        self.prompts_cut = 0    # prompt/response rows whose prompt lost its middle to fit
        self.responses_cut = 0  # ... whose response lost its end
        # Prompt/response rows: the kept rows' texts and whether prompts are in the chat template,
        # for evaluation by generation (fedtune.evaluation.generation_scores).
        self.texts: list[tuple[str, str]] = []
        self.chat = False

    def fit_summary(self, max_length: int) -> Optional[str]:
        """What fitting rows into ``max_length`` tokens changed, or None when nothing."""
        parts = [f"{n} {what}" for n, what in ((self.prompts_cut, "prompts cut in the middle"),
                                               (self.responses_cut, "responses cut at the end"),
                                               (self.dropped, "rows dropped")) if n]
        return f"to fit model.max_length = {max_length}: " + ", ".join(parts) if parts else None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.tensor(self.input_ids[i], dtype=torch.long)
        return ids, torch.ones_like(ids), torch.tensor(self.labels[i], dtype=torch.long)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def _tokenize(tokenizer, texts: Sequence[str], max_length: Optional[int], special: bool = True) -> list[list[int]]:
    """Token ids per text, cut at ``max_length`` (None: whole)."""
    if not texts:  # some tokenizers reject an empty batch
        return []
    # One batched call (Rust, parallel); skip the masks and type ids we rebuild or never use.
    enc = tokenizer(
        list(texts),
        truncation=max_length is not None,
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


class PromptFormat:
    """How a prompt becomes model input, the same in training, evaluation and ``fedtune generate``.

    With ``chat``: the tokenizer's chat template around the prompt as one user message, the
    assistant's turn opened (what an instruction-tuned model was trained on); the template's tokens
    before and after the content are fixed, so a long prompt is cut inside its content only.
    Without: the prompt's own tokens (with the tokenizer's special tokens).
    A prompt too long for its room loses its middle: its start (the instruction, usually) and its
    end (the question, usually) stay."""

    _SLOT = "\u2063fedtune-prompt\u2063"

    def __init__(self, tokenizer, chat: bool = False):
        self.tokenizer, self.chat = tokenizer, chat
        self.head: list[int] = []
        self.tail: list[int] = []
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": self._SLOT}],
                                                 add_generation_prompt=True, tokenize=False)
            head, tail = text.split(self._SLOT)
            self.head = tokenizer(head, add_special_tokens=False)["input_ids"]
            self.tail = tokenizer(tail, add_special_tokens=False)["input_ids"]

    def content(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's own tokens, whole."""
        return _tokenize(self.tokenizer, list(prompts), None, special=not self.chat)

    def build(self, content: list[int], keep: Optional[int] = None) -> list[int]:
        """The model input for one prompt, its content cut to ``keep`` tokens (middle removed)."""
        if keep is not None and keep < len(content):
            front = (keep + 1) // 2
            content = content[:front] + (content[len(content) - (keep - front):] if keep > front else [])
        return self.head + content + self.tail

    @property
    def overhead(self) -> int:
        return len(self.head) + len(self.tail)

    def inputs(self, prompts: Sequence[str], max_length: int) -> list[list[int]]:
        """Model inputs for generation: each prompt cut (middle) to fit ``max_length`` with the template."""
        room = max(1, max_length - self.overhead)
        return [self.build(ids, room) for ids in self.content(prompts)]


def encode_prompt_response(prompts, responses, tokenizer, max_length: int, rows=None,
                           chat: bool = False) -> TokenizedDataset:
    """Prompt then response (+EOS); the loss is on the response only (prompt labels = -100).

    Too long for ``max_length``: the prompt is cut first (its middle; never below half the room,
    or its own length), then the response's end; a row with no room for one response token is
    dropped. ``prompts_cut``, ``responses_cut`` and ``dropped`` count them."""
    fmt = PromptFormat(tokenizer, chat)
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if eos is not None else []
    # Tokenized separately so the prompt/response boundary is exact.
    p_ids = fmt.content(prompts)
    r_ids = _tokenize(tokenizer, list(responses), max_length, special=False)
    rows = list(rows) if rows is not None else list(range(1, len(p_ids) + 1))
    room = max_length - fmt.overhead
    kept_ids, kept_labels, kept_rows, prompts_cut, responses_cut, texts = [], [], [], 0, 0, []
    for p, r, row, text in zip(p_ids, r_ids, rows, zip(prompts, responses)):
        response = r + tail
        keep = min(len(p), max(room - len(response), min(len(p), max(1, room // 2))))
        prompt = fmt.build(p, keep)
        response_room = max_length - len(prompt)
        if response_room <= 0:  # nothing of the response fits: nothing to learn
            continue
        prompts_cut += keep < len(p)
        if len(response) > response_room:
            response, responses_cut = response[:response_room], responses_cut + 1
        kept_ids.append(prompt + response)
        kept_labels.append([IGNORE_INDEX] * len(prompt) + response)
        kept_rows.append(row)
        texts.append((str(text[0]), str(text[1])))
    ds = TokenizedDataset(kept_ids, kept_labels, kept_rows, dropped=len(rows) - len(kept_ids))
    ds.prompts_cut, ds.responses_cut, ds.texts, ds.chat = prompts_cut, responses_cut, texts, chat
    return ds


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
