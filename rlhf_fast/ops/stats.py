"""Masked statistics over 0/1 masks: `masked_mean`, `masked_var`, `masked_whiten`.

Mean and variance are small PyTorch compositions (autograd works through them). Whitening, the one that runs on
every rollout's advantages, also has a Triton path (two launches: per-row partial moments, then combine and
normalise) used when no gradient is needed; with a gradient it falls back to the PyTorch composition.
"""
from __future__ import annotations

import torch

from rlhf_fast import backend
from rlhf_fast.ops import _checks
from rlhf_fast.ops import reference as ref

WHITEN_EPS = 1e-8  # added to the variance before rsqrt
backend.register_op("masked_whiten", triton=True)


def _check(x: torch.Tensor, mask: torch.Tensor) -> None:
    _checks.check_float("x", x)
    _checks.check_mask("mask", mask)
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the same shape as x {tuple(x.shape)}; got {_checks.desc(mask)}")
    _checks.check_same_device(("x", "mask"), (x, mask))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over `mask == 1`.

    x, mask: same shape (any); dim: None (a 0-d result) or one dim (reduced away). Where nothing is valid the
    mean is 0, never NaN. Masked elements may hold NaN/Inf: they are never read into the sum.
    """
    _check(x, mask)
    if dim is not None and not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of {_checks.desc(x)}; got {dim}")
    return ref.masked_mean(x, mask, dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over `mask == 1` (0-d), Bessel-corrected when `unbiased`.

    x, mask: same shape (any). With fewer than 2 valid elements (unbiased) or none (biased) the result is 0.
    """
    _check(x, mask)
    return ref.masked_var(x, mask, unbiased=unbiased)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Whiten `x` with its masked mean and unbiased variance: (x - mean) / sqrt(var + 1e-8).

    x, mask: same shape (any; the Triton path views them as (rows, last dim)). `shift_mean=False` adds the mean
    back (rescale only). Masked positions of the result are 0; a NaN/Inf at a valid position is left out of the
    statistics and stays non-finite in the result (every backend), so one bad element cannot poison the rest. Statistics are accumulated in float32 (float64
    for float64 input); the result has x's dtype.
    """
    _check(x, mask)
    use = backend.select("masked_whiten", x.device)
    if use == "triton" and not (torch.is_grad_enabled() and x.requires_grad) and x.numel():
        from rlhf_fast.kernels import whiten as kw

        x2 = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        m2 = mask.reshape(x2.shape)
        out = torch.empty_like(x2)
        kw.masked_whiten(x2.contiguous(), m2.contiguous(), out, shift_mean=shift_mean, eps=WHITEN_EPS)
        return out.reshape(x.shape)
    return whiten_torch(x, mask, shift_mean=shift_mean)


def whiten_torch(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """`masked_whiten` as a PyTorch composition (statistics in float32, or float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ref.masked_whiten(x.to(acc), mask, shift_mean=shift_mean, eps=WHITEN_EPS).to(x.dtype)
