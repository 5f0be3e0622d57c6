"""Triton group advantages (GRPO / RLOO / REINFORCE++-baseline) in two launches; formulas in
rlhf_fast/ops/advantages.py and csrc/group_advantages_impl.h.

Launch 1 (`_group_moments_kernel`, one program per group): the group's rows are PERM[OFF[g]:OFF[g+1]] (rows sorted
by group); it writes the group's (count, mean, M2) of the scores, its mean and Bessel std, and, for
reinforce_pp_baseline, the weighted (W, mean, M2) of its centred scores x = s - mean_g.
Launch 2 (`_group_adv_kernel`, one program per BLOCK rows): where the batch is needed (scale="batch", whitening)
every program merges the G partials with Chan's formula (G is small: a few KB, L2 resident), then writes the
advantages of its rows, reading each row's group statistics through its dense index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels import whiten as kw

STAT_K = tl.constexpr(6)  # per group: n, mean, M2 of the scores; W, mean, M2 of the centred scores


@triton.jit
def _centred(s, n, mean, KEEP: tl.constexpr):
    """s - mean for a group of two or more; a group of one: s (KEEP, verl) or 0 (TRL)."""
    if KEEP:
        single = s
    else:
        single = tl.zeros_like(s)
    return tl.where(n >= 2, s - mean, single)


@triton.jit
def _group_moments_kernel(S, PERM, OFF, W, STATS, MEAN, STD, WHITEN: tl.constexpr, KEEP: tl.constexpr,
                          HAS_W: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    g = tl.program_id(0)
    begin, end = tl.load(OFF + g), tl.load(OFF + g + 1)
    i = tl.arange(0, BLOCK)
    n = tl.sum(tl.zeros([BLOCK], ACC), 0)
    mean, m2 = n, n
    for start in range(begin, end, BLOCK):
        k = start + i
        inb = k < end
        s = tl.load(S + tl.load(PERM + k, mask=inb, other=0), mask=inb, other=0).to(ACC)
        nb, mb, m2b = kw._block_moments(s, inb)
        n, mean, m2 = kw._chan(n, mean, m2, nb, mb, m2b)
    tl.store(STATS + g * STAT_K + 0, n)
    tl.store(STATS + g * STAT_K + 1, mean)
    tl.store(STATS + g * STAT_K + 2, m2)
    tl.store(MEAN + g, mean)
    tl.store(STD + g, tl.where(n > 1, tl.sqrt(m2 / tl.maximum(n - 1, 1.0)), 0.0))
    if WHITEN:  # weighted moments of the centred scores (weights: valid tokens per row)
        wn, wmean, wm2 = n * 0, n * 0, n * 0
        for start in range(begin, end, BLOCK):
            k = start + i
            inb = k < end
            row = tl.load(PERM + k, mask=inb, other=0)
            x = _centred(tl.load(S + row, mask=inb, other=0).to(ACC), n, mean, KEEP)
            if HAS_W:
                w = tl.load(W + row, mask=inb, other=0).to(ACC)
            else:
                w = tl.where(inb, 1.0, 0.0).to(ACC)
            wb = tl.sum(w, 0)
            mb = tl.sum(w * x, 0) / tl.where(wb > 0, wb, 1.0)
            d = x - mb
            wn, wmean, wm2 = kw._chan(wn, wmean, wm2, wb, mb, tl.sum(w * d * d, 0))
        tl.store(STATS + g * STAT_K + 3, wn)
        tl.store(STATS + g * STAT_K + 4, wmean)
        tl.store(STATS + g * STAT_K + 5, wm2)


@triton.jit
def _merge_partials(STATS, n_groups, COL: tl.constexpr, SBLOCK: tl.constexpr, ACC: tl.constexpr):
    """(count, mean, M2) of the batch from the per-group partials in columns COL..COL+2 (two passes)."""
    j = tl.arange(0, SBLOCK)
    total = tl.sum(tl.zeros([SBLOCK], ACC), 0)
    wsum = total
    for s in range(0, n_groups, SBLOCK):
        k = s + j
        ok = k < n_groups
        n_k = tl.load(STATS + k * STAT_K + COL, mask=ok, other=0).to(ACC)
        total += tl.sum(n_k, 0)
        wsum += tl.sum(n_k * tl.load(STATS + k * STAT_K + COL + 1, mask=ok, other=0).to(ACC), 0)
    mean = wsum / tl.where(total > 0, total, 1.0)
    m2 = total * 0
    for s in range(0, n_groups, SBLOCK):
        k = s + j
        ok = k < n_groups
        n_k = tl.load(STATS + k * STAT_K + COL, mask=ok, other=0).to(ACC)
        d = tl.load(STATS + k * STAT_K + COL + 1, mask=ok, other=0).to(ACC) - mean
        m2 += tl.sum(tl.load(STATS + k * STAT_K + COL + 2, mask=ok, other=0).to(ACC) + n_k * d * d, 0)
    return total, mean, m2


@triton.jit
def _group_adv_kernel(S, IDX, STATS, STD, ADV, n_rows, n_groups, eps, whiten_eps, MODE: tl.constexpr,
                      SCALE: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
                      ACC: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_rows
    g = tl.load(IDX + offs, mask=inb, other=0)
    s = tl.load(S + offs, mask=inb, other=0).to(ACC)
    n = tl.load(STATS + g * STAT_K + 0, mask=inb, other=0).to(ACC)
    x = _centred(s, n, tl.load(STATS + g * STAT_K + 1, mask=inb, other=0).to(ACC), KEEP)
    if MODE == 0:  # grpo
        if SCALE == 0:  # group
            d = tl.load(STD + g, mask=inb, other=0).to(ACC)
            if KEEP:
                d = tl.where(n >= 2, d, 1.0)
            a = x / (d + eps)
        elif SCALE == 1:  # batch: Bessel std of all scores
            bn, bmean, bm2 = _merge_partials(STATS, n_groups, 0, SBLOCK, ACC)
            bstd = tl.where(bn > 1, tl.sqrt(bm2 / tl.maximum(bn - 1, 1.0)), 0.0)
            a = x / (bstd + eps)
        else:
            a = x
    elif MODE == 1:  # rloo
        a = tl.where(n >= 2, x * (n / tl.maximum(n - 1, 1.0)), x)
    else:  # reinforce_pp_baseline: whiten the centred scores over the (weighted) batch
        wn, wmean, wm2 = _merge_partials(STATS, n_groups, 3, SBLOCK, ACC)
        var = tl.where(wn > 1, wm2 / tl.where(wn > 1, wn - 1, 1.0), 0.0)
        a = (x - wmean) / tl.sqrt(var + whiten_eps)
    tl.store(ADV + offs, a.to(ADV.dtype.element_ty), mask=inb)


def group_advantages(scores: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, weights, *, mode: int,
                     scale: int, keep_singletons: bool, eps: float, whiten_eps: float):
    """scores (B,) contiguous; index (B,) int64 dense group index; counts (G,) int64; weights (B,) or None.

    Returns (advantages (B,) in the scores' dtype, group mean (G,), group std (G,)) in the accumulation dtype
    (float64 for float64 scores, else float32)."""
    b, g = scores.numel(), counts.numel()
    acc_t = torch.float64 if scores.dtype == torch.float64 else torch.float32
    acc = kw.acc_dtype(scores)
    perm = torch.argsort(index, stable=True)  # (B,) rows grouped by dense index
    off = torch.zeros(g + 1, dtype=torch.int64, device=scores.device)
    torch.cumsum(counts, 0, out=off[1:])
    stats = torch.zeros(g, int(STAT_K), dtype=acc_t, device=scores.device)
    mean = torch.full((g,), float("nan"), dtype=acc_t, device=scores.device)
    std = torch.full_like(mean, float("nan"))
    adv = torch.full_like(scores, float("nan"))
    whiten = mode == 2
    w = weights.to(acc_t).contiguous() if weights is not None else stats
    max_n = int(counts.max()) if g else 1
    _group_moments_kernel[(g,)](scores, perm, off, w, stats, mean, std, WHITEN=whiten, KEEP=keep_singletons,
                                HAS_W=weights is not None, BLOCK=kw.block_for(max_n), ACC=acc)
    block = 1024
    _group_adv_kernel[(triton.cdiv(b, block),)](scores, index, stats, std, adv, b, g, eps, whiten_eps, MODE=mode,
                                                SCALE=scale, KEEP=keep_singletons, BLOCK=block,
                                                SBLOCK=kw.block_for(g), ACC=acc)
    return adv, mean, std
