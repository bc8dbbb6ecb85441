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
