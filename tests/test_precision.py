"""Mixed precision under DP (fedtune/training/precision.py)."""

import torch

from fedtune.training.precision import PerSampleLossScaler


def _step(scaler: PerSampleLossScaler, true_grads: torch.Tensor) -> torch.Tensor:
    """What the trainer does with one batch: per-sample gradients of the scaled loss in fp16
    (inf where an example overflows), unscaled into fp32 by the scaler."""
    param = torch.nn.Parameter(torch.zeros(true_grads.shape[1:]))
    param.grad_sample = (true_grads * scaler.scale).half()
    scaler.unscale_([param])
    return param.grad_sample


def test_an_overflowing_example_changes_no_other_examples_contribution():
    """fp16 under DP: one example that overflows is zeroed (its own contribution only) and the
    scale stays fixed, so every later example is scaled, rounded and kept exactly as if that
    example had never been there. A dynamic scale (halved at an overflow) would round the small
    gradients below differently from then on."""
    overflowing = torch.tensor([[1e6, 1.0]])                   # x 4096 is far past fp16's 65504
    others = torch.tensor([[3e-8, -7e-9], [0.25, 1e-3]])      # small values: their fp16 rounding depends on the scale
    with_it, without = PerSampleLossScaler(), PerSampleLossScaler()
    first = _step(with_it, torch.cat([overflowing, others]))
    assert torch.equal(first[0], torch.zeros(2))              # zeroed: as if clipped to norm 0
    assert torch.equal(first[1:], _step(without, others))    # the same batch's others: unchanged
    assert with_it.scale == without.scale == 2.0**12 and with_it.overflowed_samples == 1
    for _ in range(3):                                         # and every later batch: bit for bit
        assert torch.equal(_step(with_it, others), _step(without, others))
