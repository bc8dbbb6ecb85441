"""Evaluation: accuracy, macro-F1 and loss for classification; loss and perplexity for causal LM;
exact match and macro-F1 over label words for generated answers."""

from __future__ import annotations

import math
import unicodedata
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedtune.adapters import unwrap
from fedtune.training.losses import IGNORE_INDEX
from fedtune.training.precision import autocast


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    task: str,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 64,
) -> dict[str, float]:
    with _in_eval_mode(model) as model:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        if task == "sequence-classification":
            return _classification(model, loader, device, precision)
        return _causal_lm(model, loader, device, precision)


@contextmanager
def _in_eval_mode(model: torch.nn.Module):
    """The unwrapped model in eval mode; its training mode restored afterwards."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _classification(model, loader, device, precision) -> dict[str, float]:
    preds, golds, loss_sum, n = [], [], 0.0, 0
    for input_ids, attention_mask, labels in loader:
        with autocast(precision, device):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits = logits.float().cpu()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
        preds.append(logits.argmax(dim=-1).numpy())
        golds.append(labels.numpy())
    from sklearn.metrics import accuracy_score, f1_score  # lazy: a site's fit stage never needs it

    y_pred, y_true = np.concatenate(preds), np.concatenate(golds)
    return {
        "loss": loss_sum / max(n, 1),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "examples": n,
    }


def _causal_lm(model, loader, device, precision) -> dict[str, float]:
    # Token-weighted mean negative log-likelihood over supervised tokens.
    nll_sum, tokens, n = 0.0, 0, 0
    for input_ids, attention_mask, labels in loader:
        with autocast(precision, device):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits = logits.float().cpu()[:, :-1, :]
        target = labels[:, 1:]
        nll_sum += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        tokens += int((target != IGNORE_INDEX).sum())
        n += len(labels)
    loss = nll_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "examples": n}


@torch.no_grad()
def row_values(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    task: str,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Per row: ``loss`` (cross-entropy; for generation the row's mean token loss) and, for
    classification, ``correct`` (0/1). A site's private evaluation answer sums ``correct``
    (classification) or ``loss`` (generation) (fedtune/privacy/release.py); an audit scores its
    canaries by ``loss``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    out: list[np.ndarray] = []      # per-row loss
    correct: list[np.ndarray] = []  # classification: per-row 0/1
    with _in_eval_mode(model) as model:
        for input_ids, attention_mask, labels in loader:
            with autocast(precision, device):
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logits = logits.float().cpu()
            if task == "sequence-classification":
                correct.append((logits.argmax(dim=-1) == labels).numpy().astype(float))
                out.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy())
                continue
            logits, target = logits[:, :-1, :], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                                    reduction="none")
            tokens = (target != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            out.append((nll.sum(dim=1) / tokens).numpy())
    values = {"loss": np.concatenate(out) if out else np.zeros(0)}
    if task == "sequence-classification":
        values["correct"] = np.concatenate(correct) if correct else np.zeros(0)
    return values


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's normalization)."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_scores(answers: list[str], references: list[str], label_words: Optional[list[str]] = None) -> dict:
    """Generated answers against reference responses: ``exact_match`` after normalization and,
    with ``label_words`` (a classification task asked as instructions), ``f1``: macro-F1 over the
    labels, an answer counting as the first label word it starts with (none: wrong for every class)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    norm_ans, norm_ref = [normalize_answer(a) for a in answers], [normalize_answer(r) for r in references]
    scores = {"exact_match": float(np.mean([a == r for a, r in zip(norm_ans, norm_ref)])) if answers else 0.0,
              "examples": len(answers)}
    if label_words and answers:
        words = [normalize_answer(w) for w in label_words]

        def label_of(answer: str) -> int:
            return next((i for i, w in enumerate(words) if answer == w or answer.startswith(w + " ")), -1)

        from sklearn.metrics import f1_score

        y_true, y_pred = [label_of(r) for r in norm_ref], [label_of(a) for a in norm_ans]
        scores["f1"] = float(f1_score(y_true, y_pred, labels=list(range(len(words))), average="macro",
                                      zero_division=0))
        scores["label_match"] = float(np.mean([p == t for p, t in zip(y_pred, y_true)]))
    return scores
