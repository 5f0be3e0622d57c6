"""Native CPU kernels of the clipped value loss (csrc/value_loss.cpp) behind `torch.library.custom_op`.

Same call signatures and partial-sum layout (`rlhf_fast.kernels.loss_layout`) as the Triton launchers in
`rlhf_fast.kernels.ppo_losses` (with one chunk per row, float64 partials), so `rlhf_fast.ops.losses` drives either
through one autograd Function. The policy loss has no CPU kernel: PyTorch's vectorised exp beats a scalar loop there.
"""
from __future__ import annotations

import torch

from rlhf_fast import _native
from rlhf_fast._native import arg
from rlhf_fast.kernels.loss_layout import V_K


def _u8(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.uint8 else mask.ne(0).view(torch.uint8)


def _inputs(values, old_values, returns, mask) -> tuple:
    """The (pointer, dtype code) x 3 + mask pointer prefix both kernels take."""
    return (arg("values", values, code=True), arg("old_values", old_values, code=True),
            arg("returns", returns, code=True), arg("mask", mask, torch.uint8))


@torch.library.custom_op("rlhf_fast::ppo_value_partials", mutates_args=("partials",))
def _value_partials(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                    partials: torch.Tensor, clip: float, has_clip: bool) -> None:
    rows, t = values.shape
    _native.call("ppo_value_partials_cpu", *_inputs(values, old_values, returns, mask), rows, t, clip, has_clip,
                 arg("partials", partials, torch.float64))


@torch.library.custom_op("rlhf_fast::ppo_value_backward", mutates_args=("grad",))
def _value_backward(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                    row_weight: torch.Tensor, grad: torch.Tensor, clip: float, has_clip: bool) -> None:
    rows, t = values.shape
    _native.call("ppo_value_backward_cpu", *_inputs(values, old_values, returns, mask), rows, t, clip, has_clip,
                 arg("row_weight", row_weight, torch.float64), arg("grad", grad, code=True))


for _op in (_value_partials, _value_backward):
    _op.register_fake(lambda *args, **kwargs: None)


def value_partials(values, old_values, returns, mask, clip: float | None, part=None):
    """(rows, 1, V_K) float64 partial sums."""
    if part is None:
        part = torch.empty(values.shape[0], 1, V_K, dtype=torch.float64)
    _value_partials(values, old_values, returns, _u8(mask), part, float(clip or 0.0), clip is not None)
    return part


def value_backward(values, old_values, returns, mask, row_weight, grad, clip: float | None) -> None:
    """grad (rows, T) = row_weight[:, None] * d l / d values."""
    _value_backward(values, old_values, returns, _u8(mask), row_weight.double().contiguous(), grad,
                    float(clip or 0.0), clip is not None)
