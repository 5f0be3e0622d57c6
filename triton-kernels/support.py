"""Triton selection pass: each row's support threshold under top-k / top-p (one program per row).

z = soft_cap(logits) * inv_temp in fp32 (the row kernels' z, SOFTCAP the same cap as logprobs.py). top-k: thr_k = the
k-th largest z (ties kept), the largest t with count(z >= t) >= k. top-p: over the tokens with z >= thr_k, with p their
softmax, the largest t with mass(z >= t) >= top_p (the smallest nucleus reaching top_p, the crossing token and its ties
included).
Both predicates change only at values of z, so bisecting (at most 32 steps) on an order-preserving int32 key of z (its
bits, the negative ones flipped) ends on the key of a value of the row; a last pass reads that value back. top-k
stops early once exactly k tokens are >= the midpoint (the smallest of them is the k-th). Every step
walks the row's vocabulary tiles in order (BLOCK_V depends on V only): the result does not depend on the batch.
Used by rlhf_fast/ops/support.py; the row kernels (logprobs.py) then cut z < thr.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.logprobs import block_v, soft_cap

KEY_MIN, KEY_MAX = tl.constexpr(-(2 ** 31)), tl.constexpr(2 ** 31 - 1)  # int32 range (a jit global: constexpr)


@triton.jit
def _key(z):
    """Order-preserving int32 key of fp32 z: key(a) < key(b) iff a < b (and -0 < +0)."""
    b = z.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _z(base, cols, mask, inv_temp, softcap, SOFTCAP: tl.constexpr):
    """z of the row's tile at `cols` (0 past V: every use masks it)."""
    x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    return soft_cap(x, softcap, SOFTCAP) * inv_temp


@triton.jit
def _threshold_kernel(logits_ptr, thr_ptr, V, stride_row, inv_temp, top_k, top_p, softcap, USE_K: tl.constexpr,
                      USE_P: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    kmin = tl.full((), KEY_MAX, tl.int32)
    kmax = tl.full((), KEY_MIN, tl.int32)
    zmax = tl.full((), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _z(base, cols, mask, inv_temp, softcap, SOFTCAP)
        k = _key(z)
        kmin = tl.minimum(kmin, tl.min(tl.where(mask, k, KEY_MAX), 0))
        kmax = tl.maximum(kmax, tl.max(tl.where(mask, k, KEY_MIN), 0))
        zmax = tl.maximum(zmax, tl.max(tl.where(mask, z, float("-inf")), 0))
    lo = kmin.to(tl.int64)
    if USE_K:  # largest t with count(z >= t) >= top_k
        hi = kmax.to(tl.int64)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            c = tl.zeros((), tl.int64)
            above = tl.full((), KEY_MAX, tl.int64)  # the smallest key >= mid
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = cols < V
                k = _key(_z(base, cols, mask, inv_temp, softcap, SOFTCAP)).to(tl.int64)
                inside = mask & (k >= mid)
                c += tl.sum(tl.where(inside, 1, 0).to(tl.int64), 0)
                above = tl.minimum(above, tl.min(tl.where(inside, k, KEY_MAX), 0))
            exact = c == top_k  # exactly the k largest are >= mid: the k-th is their smallest (about half the steps)
            ok = c >= top_k
            lo = tl.where(exact, above, tl.where(ok, mid, lo))
            hi = tl.where(exact, above, tl.where(ok, hi, mid - 1))
    if USE_P:  # largest t >= thr_k with mass(z >= t) >= top_p * mass(z >= thr_k)
        total = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = _z(base, cols, mask, inv_temp, softcap, SOFTCAP)
            e = tl.exp(z - zmax)
            total += tl.sum(tl.where(mask & (_key(z).to(tl.int64) >= lo), e, 0.0), 0)
        target = top_p * total
        hi = kmax.to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            s = tl.zeros((), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = cols < V
                z = _z(base, cols, mask, inv_temp, softcap, SOFTCAP)
                s += tl.sum(tl.where(mask & (_key(z).to(tl.int64) >= mid), tl.exp(z - zmax), 0.0), 0)
            ok = s >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    thr = tl.full((), float("inf"), tl.float32)  # the value whose key is lo: the smallest z with key >= lo
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _z(base, cols, mask, inv_temp, softcap, SOFTCAP)
        thr = tl.minimum(thr, tl.min(tl.where(mask & (_key(z).to(tl.int64) >= lo), z, float("inf")), 0))
    tl.store(thr_ptr + row, thr)


def support_threshold(logits, inv_temp, top_k, top_p, thr, softcap=0.0) -> None:
    """logits (N, V) rows contiguous -> thr (N,) fp32 in z units (softcap >= 0, 0: off); callers skip it when nothing
    is cut."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1 and thr.dtype == torch.float32 and thr.is_contiguous()
    use_k, use_p = 0 < top_k < vocab, top_p < 1.0
    if not (use_k or use_p):
        thr.fill_(float("-inf"))
        return
    if n == 0:
        return
    _threshold_kernel[(n,)](logits, thr, vocab, logits.stride(0), float(inv_temp), int(top_k), float(top_p),
                            float(softcap), USE_K=use_k, USE_P=use_p, SOFTCAP=softcap != 0,
                            BLOCK_V=block_v(vocab, logits.device),
                            num_warps=8 if logits.is_cuda else 1)
