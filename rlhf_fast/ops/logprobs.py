"""Token log-probabilities and entropy: `token_logprobs` (from logits) and `linear_token_logprobs` (from hidden
states and an lm_head, without materialising the logits).

Backends (chosen per call by `rlhf_fast.backend.select`):
  * triton: `rlhf_fast.kernels.logprobs` / `rlhf_fast.kernels.linear_logprobs` (CUDA, or CPU under TRITON_INTERPRET=1).
  * native: `rlhf_fast._C.token_logprobs_{fwd,bwd}_cpu` (csrc/logprobs.cpp), one online-softmax pass per row, wrapped
    below in `torch.library.custom_op`; the linear op runs fixed-shape matmul tiles + the same row kernel
    (`rlhf_fast.ops._linear_chunked`).
  * torch: `rlhf_fast.ops.reference.token_logprobs`; the linear op uses the same chunked path with a PyTorch row kernel.

Batch invariance: a row's log-prob and entropy are bitwise independent of the batch it is in, its position and
`chunk_size`, for the native and triton backends on a given machine (same build, BLAS, torch thread count, GPU):
each row's softmax runs in a fixed order over fixed vocabulary blocks; the linear op's CPU path sends every row
through an identical (ROW_TILE, H) x (H, V) matmul (zero-padded tiles), its Triton path computes each row's logits
with fixed tiles (tl.dot, no split-K) and merges fixed vocabulary ranges in order. The torch fallback is only
close (PyTorch's vectorised exp may round a tensor's tail elements differently), not bitwise invariant.

Truncated support (top_k / top_p, `rlhf_fast.ops.support`): a selection pass gives each row a threshold thr on
z = logits * (1 / temperature) (or the caller replays the rollout's), and the row kernels cut z < thr (except the
label) to -inf before the softmax. With top_k=0, top_p=1 and no replayed threshold nothing changes: the same
kernels run as before, bitwise.

Final logit soft-cap (`softcap` c > 0, Gemma 2/3): every backend maps the logits to c * tanh(logits / c) before the
temperature, inside its row kernels (no capped copy of the logits is made), with the derivative 1 - tanh^2(logits / c)
in the backward pass; the support threshold is on the capped, tempered z. softcap=0: the kernels of before, bitwise.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from rlhf_fast.backend import register_op, select
from rlhf_fast.ops import _checks, reference
from rlhf_fast.ops._linear_chunked import (linear_logprobs_chunked, linear_logprobs_triton, native_rows_bwd,
                                           native_rows_fwd)
from rlhf_fast.ops.support import check_softcap, check_support, row_thresholds, truncated

register_op("token_logprobs", triton=True, native_cpu="token_logprobs_fwd_cpu")
register_op("linear_token_logprobs", triton=True, native_cpu="token_logprobs_fwd_cpu")

LABEL_DTYPES = (torch.int64, torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Layer 1: the native row kernel as custom ops (CPU).
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::token_logprobs_fwd", mutates_args=())
def _native_fwd(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, ignore_index: int,
                thr: Optional[torch.Tensor] = None,
                softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) contiguous, labels (N,) int64, thr (N,) | None, softcap >= 0 -> logp, lse, entropy (N,) fp32
    (fp64 for fp64 logits)."""
    n = logits.shape[0]
    out_dtype = reference._compute_dtype(logits)
    logp, lse, ent = (torch.empty(n, dtype=out_dtype, device=logits.device) for _ in range(3))
    native_rows_fwd(logits, labels, inv_temp, ignore_index, logp, lse, ent, thr, softcap)
    return logp, lse, ent


@_native_fwd.register_fake
def _(logits, labels, inv_temp, ignore_index, thr=None, softcap=0.0):
    out_dtype = reference._compute_dtype(logits)
    return tuple(logits.new_empty(logits.shape[:1], dtype=out_dtype) for _ in range(3))


@torch.library.custom_op("rlhf_fast::token_logprobs_bwd", mutates_args=())
def _native_bwd(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                dlogp: torch.Tensor, dent: torch.Tensor, inv_temp: float, ignore_index: int,
                thr: Optional[torch.Tensor] = None, softcap: float = 0.0) -> torch.Tensor:
    """dlogits (N, V) in logits' dtype, written once per element (0 off the support)."""
    dlogits = torch.empty_like(logits)
    native_rows_bwd(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, dlogits, thr, softcap)
    return dlogits


@_native_bwd.register_fake
def _(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, thr=None, softcap=0.0):
    return torch.empty_like(logits)


def _native_setup_context(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, thr, softcap = inputs
    _, lse, ent = output
    ctx.mark_non_differentiable(lse)  # internal: saved for the backward pass only
    ctx.save_for_backward(logits, labels, lse, ent, thr)
    ctx.inv_temp, ctx.ignore_index, ctx.softcap = inv_temp, ignore_index, softcap


def _native_backward(ctx, dlogp, dlse, dent):
    logits, labels, lse, ent, thr = ctx.saved_tensors
    dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.to(lse.dtype).contiguous()
    dent = torch.zeros_like(lse) if dent is None else dent.to(lse.dtype).contiguous()
    dlogits = _native_bwd(logits, labels, lse, ent, dlogp, dent, ctx.inv_temp, ctx.ignore_index, thr, ctx.softcap)
    return dlogits, None, None, None, None, None


_native_fwd.register_autograd(_native_backward, setup_context=_native_setup_context)


class _TritonTokenLogprobs(torch.autograd.Function):
    """Autograd around triton-kernels/logprobs.py (fp32/bf16/fp16 logits (N, V) -> fp32 logp, entropy (N,))."""

    @staticmethod
    def forward(ctx, logits, labels, inv_temp, ignore_index, thr, softcap):
        from rlhf_fast.kernels.logprobs import logprobs_fwd

        n = logits.shape[0]
        logp, lse, ent = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
        logprobs_fwd(logits, labels, inv_temp, ignore_index, logp, lse, ent, thr, softcap)
        ctx.save_for_backward(logits, labels, lse, ent, thr)
        ctx.cfg = (inv_temp, ignore_index)
        ctx.softcap = softcap
        return logp, ent

    @staticmethod
    def backward(ctx, dlogp, dent):
        from rlhf_fast.kernels.logprobs import logprobs_bwd

        logits, labels, lse, ent, thr = ctx.saved_tensors
        dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.float().contiguous()
        dent = torch.zeros_like(lse) if dent is None else dent.float().contiguous()
        dlogits = torch.empty_like(logits)
        logprobs_bwd(logits, labels, lse, ent, dlogp, dent, *ctx.cfg, dlogits, thr, ctx.softcap)
        return dlogits, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------------------------------

def _check_common(labels: torch.Tensor, lead: torch.Size, vocab: int, temperature: float, ignore_index: int,
                  lead_name: str, softcap: float) -> None:
    _checks.check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    check_softcap(softcap)
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {tuple(lead)} ({lead_name} without its last dim); "
                         f"got {_checks.desc(labels)}")
    if not isinstance(temperature, (int, float)) or not (temperature > 0) or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels.numel() and not (labels.is_cuda and torch.cuda.is_current_stream_capturing()):  # (a CUDA graph: no sync)
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            vals = labels[bad][:3].tolist()
            raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found values "
                             f"such as {vals} ({_checks.desc(labels)})")


def _check_logits(logits, labels, temperature, ignore_index, softcap) -> None:
    _checks.check_float("logits", logits, min_ndim=1)
    _checks.check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    _checks.check_same_device(["logits", "labels"], [logits, labels])
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dim of size >= 1; got {_checks.desc(logits)}")
    _check_common(labels, logits.shape[:-1], logits.shape[-1], temperature, ignore_index, "logits", softcap)


def _check_linear(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, softcap) -> None:
    _checks.check_float("hidden", hidden, min_ndim=1)
    _checks.check_float("weight", weight, ndim=2)
    _checks.check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    if bias is not None:
        _checks.check_float("bias", bias, ndim=1)
    _checks.check_same_device(["hidden", "weight", "labels", "bias"], [hidden, weight, labels, bias])
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}; got {_checks.desc(weight)}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias must have hidden's dtype {hidden.dtype}; got {_checks.desc(bias)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last dim; "
                         f"got {_checks.desc(weight)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (vocabulary entry); got {_checks.desc(weight)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {_checks.desc(bias)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_common(labels, hidden.shape[:-1], weight.shape[0], temperature, ignore_index, "hidden", softcap)


# ---------------------------------------------------------------------------------------------------------------
# Layer 3: public functions.
# ---------------------------------------------------------------------------------------------------------------

SUPPORT_DOC = """
        top_k: the rollout's top-k (0, or >= V: off). top_p: its top-p (1.0: off). Applied as vLLM's and Hugging
            Face's samplers do: temperature first, then top-k (the k largest, every token tied with the k-th kept),
            then the smallest nucleus of those whose probability reaches top_p (the token that crosses it and its
            ties kept). With either on, logp and entropy are those of that truncated, renormalised distribution:
            tokens with z = soft_cap(logits) / temperature below the row's threshold get probability 0 and no
            gradient, and the gradient flows through the kept logits (d logp / d z_i = [i = label] - p_i,
            d H / d z_i = -p_i (log p_i + H), over the kept i). The label is always kept, so a log-prob is never
            -inf.
        support: where the support under the current (updated) weights comes from.
            "recompute" (default): from these logits, by a selection pass over each row (the threshold is the k-th
            largest z / the nucleus boundary, found exactly by bisection on the bits of z). At the rollout's
            weights it is the support sampled from; as the weights move it moves with them (a sampled token that
            falls out of it still counts, as the label is kept).
            "replay": the rollout's recorded threshold `support_threshold` (from `ops.support_threshold` at
            sampling time): no selection runs, and the support is {z >= recorded threshold} on the current logits
            (plus the label). Both give the same result at unchanged weights and bitwise-equal logits. A threshold
            equal to the boundary token's z would drop that token wherever the trainer's logits round an ulp lower,
            so `RolloutEngine` records the midpoint between it and the next lower z (`Completion.support_threshold`,
            `rollout.sampling.replay_threshold`): the same tokens on the engine's logits, and on the trainer's.
        support_threshold: (...) float, the labels' shape: the recorded threshold per token, in units of
            z = soft_cap(logits) / temperature at this call's temperature and softcap (-inf: nothing cut). Only with
            support="replay".
        softcap: the final logit soft-cap c of Gemma 2/3 (`final_logit_softcapping`): the logits become
            c * tanh(logits / c) before the temperature, as transformers applies it, with the derivative
            1 - tanh^2(logits / c) in the backward pass; 0 (default): off."""


def _thresholds(logits2d, inv_temp, top_k, top_p, support_threshold, backend, cd, softcap):
    """(N,) support thresholds in `cd` (replayed or recomputed from logits2d (N, V)), or None when nothing is cut."""
    if support_threshold is not None:
        return support_threshold.detach().reshape(-1).to(cd).contiguous()
    if not truncated(logits2d.shape[-1], top_k, top_p):
        return None
    with torch.no_grad():
        return row_thresholds(logits2d.detach(), inv_temp, top_k, top_p, backend, softcap).to(cd)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, support: str = "recompute", support_threshold: torch.Tensor | None = None,
                   ignore_index: int = -100, return_entropy: bool = False, softcap: float = 0.0):
    """Log-probability of each label under `softmax(soft_cap(logits) / temperature)`, in one online-softmax pass per
    row; with top_k / top_p, under the truncated distribution the rollout sampled from.

    Args:
        logits: (..., V) float32/bfloat16/float16 (float64 accepted: the result is then float64).
        labels: (...) int64 (int32 accepted), in [0, V) or equal to `ignore_index`.
        temperature: divides the logits (sampling temperature); > 0.{support}
        ignore_index: label marking positions to skip: their log-prob and entropy are 0 and get no gradient.
        return_entropy: also return the entropy of the (truncated) distribution per position.
    Returns:
        logp (...) float32, or (logp, entropy), both (...) float32. Differentiable w.r.t. logits.
    """
    _check_logits(logits, labels, temperature, ignore_index, softcap)
    check_support(top_k, top_p, support, support_threshold, labels.shape, logits.device)
    backend = select("token_logprobs", logits.device)
    lead, vocab = labels.shape, logits.shape[-1]
    logits2d = logits.reshape(-1, vocab)  # (N, V)
    softcap = float(softcap)
    if backend == "torch" or (backend == "triton" and logits.dtype == torch.float64):  # Triton computes in fp32
        thr = _thresholds(logits2d, 1.0 / temperature, top_k, top_p, support_threshold, "torch",
                          reference._compute_dtype(logits), softcap)
        return reference.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                        support_threshold=None if thr is None else thr.reshape(lead),
                                        return_entropy=return_entropy, softcap=softcap)
    logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()  # (N,)
    thr = _thresholds(logits2d, 1.0 / temperature, top_k, top_p, support_threshold, backend,
                      reference._compute_dtype(logits), softcap)
    if backend == "native":
        logp, _, ent = _native_fwd(logits2d, labels1d, 1.0 / temperature, ignore_index, thr, softcap)
    else:
        logp, ent = _TritonTokenLogprobs.apply(logits2d, labels1d, 1.0 / temperature, ignore_index, thr, softcap)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, support: str = "recompute", support_threshold: torch.Tensor | None = None,
                          ignore_index: int = -100, return_entropy: bool = False, chunk_size: int | None = None,
                          softcap: float = 0.0):
    """`token_logprobs(hidden @ weight.T + bias, labels, ...)` without materialising the (N, V) logits.

    Rows whose label is `ignore_index` are dropped before any matmul. The rest go through the lm_head in chunks of
    `chunk_size` tokens (CPU: a multiple of `ROW_TILE`; default keeps a chunk's logits near 32 MiB); the backward pass
    recomputes each chunk's logits and accumulates the gradients of hidden, weight and bias in fp32. With top_k /
    top_p, each chunk's thresholds come from a selection pass over its logits (kept for the backward pass); on the
    Triton backend that path computes each chunk's logits with a matmul and runs the Triton selection and row
    kernels on them (the fully fused Triton kernel serves top_k=0, top_p=1 only).

    Args:
        hidden: (..., H) float32/bfloat16/float16/float64, the policy's last hidden states.
        weight: (V, H) same dtype, the lm_head weight.
        labels: (...) int64/int32 in [0, V) or `ignore_index`.
        bias: (V,) same dtype, or None.
        temperature, top_k, top_p, support, support_threshold, ignore_index, return_entropy: as in `token_logprobs`.
        chunk_size: tokens per chunk (memory/speed knob only: results are bitwise independent of it).
        softcap: the final logit soft-cap c (Gemma 2/3): each chunk's logits become c * tanh(logits / c) before the
            temperature, inside the row kernels (the fused Triton kernel: on each logits tile); 0: off.
    Returns:
        logp (...) float32, or (logp, entropy). Differentiable w.r.t. hidden, weight and bias.
    """
    _check_linear(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, softcap)
    check_support(top_k, top_p, support, support_threshold, labels.shape, hidden.device)
    backend = select("linear_token_logprobs", hidden.device)
    lead, width = labels.shape, hidden.shape[-1]
    hidden2d = hidden.reshape(-1, width)  # (N, H)
    labels1d = labels.reshape(-1).to(torch.int64)  # (N,)
    rows = "torch" if backend == "triton" and hidden.dtype == torch.float64 else backend  # Triton computes in fp32
    cut = support_threshold is not None or truncated(weight.shape[0], top_k, top_p)
    softcap = float(softcap)
    if rows == "triton" and not cut:
        logp, ent = linear_logprobs_triton(hidden2d, weight, bias, labels1d, 1.0 / temperature, ignore_index,
                                           chunk_size, softcap)
    else:
        thr = None if support_threshold is None else support_threshold.detach().reshape(-1)
        pick = partial(row_thresholds, inv_temp=1.0 / temperature, top_k=top_k, top_p=top_p, backend=rows,
                       softcap=softcap)
        logp, ent = linear_logprobs_chunked(hidden2d, weight, bias, labels1d, 1.0 / temperature, ignore_index,
                                            chunk_size, rows, thr, pick if cut and thr is None else None, softcap)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


token_logprobs.__doc__ = token_logprobs.__doc__.format(support=SUPPORT_DOC)
