"""oneDNN's fp32 linear on a weight reordered once into its blocked layout (CPU).

On this project's AVX2 CPU, `x @ W.T` against a whole vocabulary with a few hundred rows or fewer runs 1.5-2x faster
through oneDNN on a reordered weight than through MKL's GEMM on the plain one (vocab 32000, hidden 256: 64 rows
14 ms vs 30 ms, 256 rows 37 ms vs 62 ms); the reorder costs about one pass over the weight, so it pays once the
weight is used for a few hundred rows. Used by the rollout's decode steps and the chunked lm_head ops (ROW_TILE-row
tiles). `torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight` are PyTorch's own (what its CPU compiler
emits for linear layers); without them every caller keeps its GEMM.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


MIN_ELEMENTS = 1 << 21  # smaller weights: oneDNN's per-call overhead and the reorder outweigh its faster GEMM


def pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """`weight` (out, in) reordered for about `rows_hint` rows per call; None where oneDNN does not apply or does
    not pay: not a plain fp32 CPU tensor (CUDA, bf16, a sharded DTensor), or fewer than MIN_ELEMENTS elements
    (measured, 1 thread: a 40 x 128 lm_head 53 us a call vs 8 us with MKL; 1024 x 128 even; 8192 x 256 with 64
    rows 5.6 ms vs 9.3 ms). The decision depends on the weight alone, so every call on a weight takes one path."""
    w = weight.detach()
    if (w.device.type != "cpu" or w.dtype != torch.float32 or type(w) is not torch.Tensor
            or w.numel() < MIN_ELEMENTS or not available()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), max(1, int(rows_hint)))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, in) fp32 @ the packed weight's transpose (+ bias) -> (R, out)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
