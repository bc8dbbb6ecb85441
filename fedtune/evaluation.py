"""Evaluation: accuracy, macro-F1 and loss for classification; loss and perplexity for causal LM."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

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
