"""Triton kernels for token log-probabilities and entropy from logits (one program per row).

Forward: one online-softmax pass over the row in BLOCK_V tiles -> logp, lse, entropy (fp32).
Backward: one pass writing dlogits (may be the logits buffer itself).
Truncated support (top-k / top-p, thresholds from support.py or replayed): with HAS_THR, z < thr[row] is -inf
except at the label, so those tokens leave lse, logp and the entropy and get dlogits 0 (their p is 0).
Final logit soft-cap (SOFTCAP, Gemma 2/3): z = softcap * tanh(x / softcap) * inv_temp, capped before the
temperature; the backward multiplies by its derivative 1 - tanh^2(x / softcap). Off, the kernels are unchanged.
The tile size depends only on V, so a row's result does not depend on the batch it is in (batch invariance).
Autograd lives in rlhf_fast/ops/logprobs.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def block_v(vocab: int, device: torch.device) -> int:
    """Vocabulary tile: a function of V (and device type) only."""
    cap = 4096 if device.type == "cuda" else 512
    return max(16, min(triton.next_power_of_2(vocab), cap))


@triton.jit
def tanh_d(y):
    """tanh(y) and its derivative 1 - tanh^2(y) in fp32, from exp alone (the interpreter has no libdevice), as
    csrc/logprobs.cpp: for a = |y| >= 0.25, (1 - e) / (1 + e) and 4 e / (1 + e)^2 with e = exp(-2a) <= 0.61 (no
    cancellation); below, the odd Taylor polynomial to y^9. +-inf gives +-1 (derivative 0)."""
    a = tl.abs(y)
    y2 = y * y
    e = tl.exp(-2.0 * a)
    small = a < 0.25
    poly = -1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))
    t = tl.where(small, a + a * y2 * poly, (1.0 - e) / (1.0 + e))
    d = tl.where(small, 1.0 - t * t, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return tl.where(y < 0, -t, t), d


@triton.jit
def soft_cap(x, softcap, SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap) (fp32 x), or x when SOFTCAP is off."""
    if SOFTCAP:
        t, _ = tanh_d(x / softcap)
        x = softcap * t
    return x


@triton.jit
def _cut(z, cols, thr_ptr, row, keep, HAS_THR: tl.constexpr):
    """z with -inf where z < thr[row], except at column `keep` (the label; -1: none)."""
    if HAS_THR:
        z = tl.where((z < tl.load(thr_ptr + row)) & (cols != keep), float("-inf"), z)
    return z


@triton.jit
def _fwd_kernel(logits_ptr, labels_ptr, thr_ptr, logp_ptr, lse_ptr, ent_ptr, V, stride_row, inv_temp, ignore_index,
                softcap, HAS_THR: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    keep = tl.where(valid, label, -1)
    m = tl.full((), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((), tl.float32)  # sum exp(z - m)
    t = tl.zeros((), tl.float32)  # sum exp(z - m) * (z - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            x = tl.where(cols < V, soft_cap(x, softcap, SOFTCAP), float("-inf"))
        z = _cut(x * inv_temp, cols, thr_ptr, row, keep, HAS_THR)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite reference point even for all -inf so far
        d = z - m_ref
        e = tl.exp(d)
        ed = tl.where(e > 0, e * d, 0.0)
        sc = tl.exp(m - m_ref)
        t = tl.where(s > 0, sc * (t + (m - m_ref) * s), 0.0) + tl.sum(ed, 0)
        s = s * sc + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    zy = soft_cap(tl.load(base + safe_label).to(tl.float32), softcap, SOFTCAP) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, zy - lse, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, tl.log(s) - t / s, 0.0))


# Backward. With z = x / T, p = softmax(z), lse = logsumexp(z):
#   logp = z_y - lse                      =>  d logp / d z_j = 1[j = y] - p_j
#   H = -sum_k p_k log p_k = lse - sum_k p_k z_k
#   d(sum_k p_k z_k)/d z_j = p_j + sum_k z_k p_k (1[k = j] - p_j) = p_j + p_j z_j - p_j E_p[z]
#   d H / d z_j = p_j - (p_j + p_j z_j - p_j E_p[z]) = -p_j (z_j - E_p[z]),   with E_p[z] = lse - H
# so for upstream grads g (of logp) and gH (of H):  dx_j = (g (1[j = y] - p_j) - gH p_j (z_j - E_p[z])) / T.
# Ignored rows have g = gH = 0 and get dx = 0. On a truncated support the sums run over the kept tokens only and the
# cut ones have p_j = 0 (z_j = -inf), so the same formula gives them dx_j = 0.
# Soft-capped (z = c tanh(x / c) / T): dx_j = (g (1[j = y] - p_j) - gH p_j (z_j - E_p[z])) / T * (1 - tanh^2(x_j / c)).
@triton.jit
def _bwd_kernel(logits_ptr, labels_ptr, thr_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, out_ptr, V, stride_row,
                stride_out, inv_temp, ignore_index, softcap, HAS_THR: tl.constexpr, SOFTCAP: tl.constexpr,
                BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    out = out_ptr + row * stride_out
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    keep = tl.where(valid, label, -1)
    g = tl.where(valid, tl.load(dlogp_ptr + row), 0.0)
    gh = tl.where(valid, tl.load(dent_ptr + row), 0.0)
    lse = tl.load(lse_ptr + row)
    mean_z = lse - tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            t, dcap = tanh_d(x / softcap)  # as soft_cap computes it
            x = tl.where(mask, softcap * t, float("-inf"))
        z = _cut(x * inv_temp, cols, thr_ptr, row, keep, HAS_THR)
        p = tl.exp(z - lse)
        centred = tl.where(p > 0, p * (z - mean_z), 0.0)
        d = tl.where(cols == label, g, 0.0) - p * g - centred * gh
        if SOFTCAP:
            d = d * dcap
        tl.store(out + cols, (d * inv_temp).to(out_ptr.dtype.element_ty), mask=mask)


def logprobs_fwd(logits, labels, inv_temp, ignore_index, logp, lse, ent, thr=None, softcap=0.0) -> None:
    """logits (N, V) rows contiguous; labels (N,) int64; thr (N,) fp32 or None; softcap >= 0 (0: off); writes logp,
    lse, ent (N,) fp32."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1 and labels.dtype == torch.int64
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (logp, lse, ent))
    if n == 0:
        return
    _fwd_kernel[(n,)](logits, labels, _thr(thr, logp), logp, lse, ent, vocab, logits.stride(0), float(inv_temp),
                      int(ignore_index), float(softcap), HAS_THR=thr is not None, SOFTCAP=softcap != 0,
                      BLOCK_V=block_v(vocab, logits.device), num_warps=8 if logits.is_cuda else 1)


def _thr(thr, like):
    assert thr is None or (thr.dtype == torch.float32 and thr.is_contiguous() and thr.shape == like.shape)
    return like if thr is None else thr  # any pointer when HAS_THR is off


def logprobs_bwd(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out, thr=None, softcap=0.0) -> None:
    """Writes dlogits (N, V) into `out` (logits' dtype; may be `logits` itself)."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1 and out.stride(1) == 1 and out.shape == logits.shape
    if n == 0:
        return
    _bwd_kernel[(n,)](logits, labels, _thr(thr, lse), lse, ent, dlogp, dent, out, vocab, logits.stride(0),
                      out.stride(0), float(inv_temp), int(ignore_index), float(softcap), HAS_THR=thr is not None,
                      SOFTCAP=softcap != 0, BLOCK_V=block_v(vocab, logits.device),
                      num_warps=8 if logits.is_cuda else 1)
