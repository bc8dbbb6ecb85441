"""Losses whose per-sample gradients depend on that sample alone, as DP-SGD requires."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean over the batch of each example's own loss.

    For causal LM each example's loss is the mean over its own supervised tokens. The usual
    mean over all tokens of the batch would scale one example's gradient by the other
    examples' token counts, so a per-sample gradient would no longer depend on its sample alone.
    """
    if task == "sequence-classification":
        return F.cross_entropy(logits, labels)
    return per_example_lm_loss(logits, labels).mean()


def label_prior(label_ids, num_labels: int) -> list[float]:
    """Class frequencies of ``label_ids`` (ints in ``range(num_labels)``), add-one smoothed so that a
    class absent from the rows keeps a finite log-prior."""
    counts = [1] * num_labels
    for i in label_ids:
        counts[int(i)] += 1
    total = sum(counts)
    return [c / total for c in counts]


def logit_adjustment(prior: list[float], num_labels: int) -> torch.Tensor:
    """What ``train.class_balance = "logit-adjusted"`` adds to the logits in the loss: log(prior).
    Training on logits + log(prior) makes the softmax of the model's own logits estimate the
    class-balanced posterior (Menon et al., "Long-tail learning via logit adjustment", 2021)."""
    if len(prior) != num_labels:
        raise ValueError(f"train.class_prior has {len(prior)} values for {num_labels} labels")
    p = torch.tensor(prior, dtype=torch.float32)
    return torch.log(p / p.sum())


def class_weights(prior: list[float], num_labels: int) -> torch.Tensor:
    """What ``train.class_balance = "reweighted"`` multiplies each example's gradient by, after DP
    clipping: the smallest class prior over its own class's prior. Each class then pulls with the
    same total weight (under DP every clipped gradient has about the same norm, so without weights
    each class pulls in proportion to its rows and a skewed site learns its majority class). Every
    weight is at most 1, so a clipped gradient stays within the clipping norm: no privacy cost,
    whatever prior the coordinator sends."""
    if len(prior) != num_labels:
        raise ValueError(f"train.class_prior has {len(prior)} values for {num_labels} labels")
    p = torch.tensor(prior, dtype=torch.float32)
    return p.min() / p


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def causal_lm_token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of every supervised token (flat) and the row each belongs to, computing logits only
    at the positions that predict one. With instruction rows (a long prompt, a short response) the
    vocabulary projection and its softmax at every prompt position (49,152 x 96 values per row for
    SmolLM2) would dominate memory and much of the time, for terms the loss masks out anyway."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    targets = labels[:, 1:][keep[:, :-1]]
    rows = keep.nonzero()[:, 0]
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    except TypeError:  # a model without transformers' logits_to_keep: every position, then the same ones
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="none"), rows


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean loss over its own supervised tokens (shape: batch); equal to
    ``per_example_lm_loss`` on the full logits (tests/test_dp_training.py)."""
    token_loss, rows = causal_lm_token_losses(model, input_ids, attention_mask, labels)
    sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    return sums / torch.bincount(rows, minlength=labels.shape[0]).clamp(min=1)
