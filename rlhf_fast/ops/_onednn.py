"""oneDNN's fp32 linear on a weight reordered into its blocked layout (CPU).

On this project's AVX2 CPU, `x @ W.T` against a whole vocabulary with a few hundred rows or fewer runs 1.5-2x faster
through oneDNN on a reordered weight than through MKL's GEMM on the plain one (vocab 32000, hidden 256: 64 rows
14 ms vs 30 ms, 256 rows 37 ms vs 62 ms); the reorder costs about one pass over the weight, so it pays once the
weight is used for a few hundred rows. The reordered copy is as large as the weight, so no caller keeps one longer
than it must: the rollout's decode steps hold the lm_head's copy for one `generate` (`DecoderLM.packed_head`), and
the chunked lm_head op reorders one vocab block at a time into a buffer of a few MiB (`_linear_chunked`).
`torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight` are PyTorch's own (what its CPU compiler emits for
linear layers); without them every caller keeps its GEMM.
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


def applies(weight: torch.Tensor) -> bool:
    """Whether oneDNN applies to `weight` (out, in) and pays: a plain fp32 CPU tensor (not CUDA, bf16, a sharded
    DTensor) of at least MIN_ELEMENTS elements (measured, 1 thread: a 40 x 128 lm_head 53 us a call vs 8 us with MKL;
    1024 x 128 even; 8192 x 256 with 64 rows 5.6 ms vs 9.3 ms). It depends on the weight alone, so every call on a
    weight takes one path."""
    return usable(weight) and weight.numel() >= MIN_ELEMENTS


def usable(weight: torch.Tensor) -> bool:
    """Whether oneDNN takes `weight` at all: a plain fp32 CPU tensor (not CUDA, bf16, a sharded DTensor)."""
    w = weight.detach()
    return w.device.type == "cpu" and w.dtype == torch.float32 and type(w) is torch.Tensor and available()


def reorder(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`weight` (out, in) fp32 CPU reordered for about `rows_hint` rows per call: a new tensor of the weight's size."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), max(1, int(rows_hint)))


def pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """`reorder(weight, rows_hint)` where oneDNN `applies`, else None."""
    return reorder(weight, rows_hint) if applies(weight) else None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, in) fp32 @ the packed weight's transpose (+ bias) -> (R, out)."""
    if torch.compiler.is_compiling():  # inductor lowers this op only for weights it froze itself
        return _linear_op(x.contiguous(), packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@torch.library.custom_op("rlhf_fast::onednn_linear", mutates_args=())
def _linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` as an opaque op in a compiled graph (a rollout's compiled decode step)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_linear_op.register_fake
def _(x, packed, bias):
    return x.new_empty((x.shape[0], packed.shape[0]))


OP = torch.ops.rlhf_fast.onednn_linear.default  # how `_linear_op` appears in a captured graph
