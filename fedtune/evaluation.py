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
from fedtune.training.losses import causal_lm_loss, causal_lm_token_losses
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
        # How many classes the model answers at all (1: it always predicts the same class).
        "predicted_classes": int(len(np.unique(y_pred))),
    }


def _causal_lm(model, loader, device, precision) -> dict[str, float]:
    # Token-weighted mean negative log-likelihood over supervised tokens.
    nll_sum, tokens, n = 0.0, 0, 0
    for input_ids, attention_mask, labels in loader:
        with autocast(precision, device):
            token_loss, _ = causal_lm_token_losses(model, input_ids.to(device), attention_mask.to(device),
                                                   labels.to(device))
        nll_sum += float(token_loss.sum())
        tokens += token_loss.numel()
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
            if task != "sequence-classification":  # each row's mean token loss
                with autocast(precision, device):
                    loss = causal_lm_loss(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
                out.append(loss.float().cpu().numpy())
                continue
            with autocast(precision, device):
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logits = logits.float().cpu()
            correct.append((logits.argmax(dim=-1) == labels).numpy().astype(float))
            out.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy())
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


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                     device: torch.device, precision: str = "fp32", batch_size: int = 8) -> list[str]:
    """Greedy answers to already formatted prompts (``PromptFormat.build``), left-padded in batches."""
    pad, answers = tokenizer.pad_token_id, []
    with _in_eval_mode(model) as model:
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            with autocast(precision, device):
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def generation_scores(model: torch.nn.Module, tokenizer, dataset, eval_cfg, max_length: int,
                      device: torch.device, precision: str = "fp32") -> tuple[dict, list[dict]]:
    """Evaluation by generation of prompt/response rows (``eval`` config section): the first
    ``max_rows`` prompts answered greedily; ``exact_match`` and, where the responses are at most
    ``max_label_words`` distinct values, ``f1`` (macro) and ``label_match`` over them; plus the
    first ``samples`` prompts with their answers. Nothing where the rows are not prompt/response
    or ``eval.generate = false``."""
    from fedtune.data.tokenization import PromptFormat

    texts = getattr(dataset, "texts", None) or []
    if eval_cfg.generate is False or not texts:
        return {}, []
    rows = texts[:eval_cfg.max_rows]
    prompts = PromptFormat(tokenizer, dataset.chat).inputs([p for p, _ in rows], max_length)
    answers = generate_answers(model, tokenizer, prompts, eval_cfg.max_new_tokens, device, precision)
    references = [r for _, r in rows]
    words = sorted({normalize_answer(r) for _, r in texts})
    scores = answer_scores(answers, references, words if len(words) <= eval_cfg.max_label_words else None)
    scores["generated"] = scores.pop("examples")
    samples = [{"prompt": p, "answer": a, "reference": r}
               for (p, r), a in zip(rows[:eval_cfg.samples], answers)]
    return scores, samples
