"""Triton masked whitening in two launches: per-row partial moments, then combine + normalise.

Launch 1 (`_row_moments_kernel`, or the GAE scan, which emits the same partials) writes, per row (sequence),
(count, mean, M2) of its valid elements. Launch 2 (`_normalize_kernel`) has every program combine all rows'
partials with Chan's parallel formula (a few KB, L2 resident) and whiten its own row:
    out = (x - mean) * rsqrt(var + eps) [+ mean if not shift_mean],  var = M2 / (n - 1) (0 when n < 2),
and 0 on masked positions. Valid elements that are NaN/Inf are left out of the statistics (and stay non-finite in
the output). Rows are [CU[i], CU[i + 1]) of a flat buffer (padded rows: CU = arange * T).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

STAT_K = tl.constexpr(3)  # (count, mean, M2) per row


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub & LeVeque 1979)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _block_moments(x, valid):
    """(count, mean, M2) of x over valid, finite elements in one block, two passes in registers (a non-finite
    valid x is left out of the statistics, and the normalisation leaves it non-finite)."""
    valid = valid & (tl.abs(x) < float("inf"))
    n = tl.sum(valid.to(x.dtype), 0)
    mean = tl.sum(tl.where(valid, x, 0.0), 0) / tl.maximum(n, 1.0)
    d = tl.where(valid, x - mean, 0.0)
    return n, mean, tl.sum(d * d, 0)


@triton.jit
def _row_moments_kernel(X, M, CU, STATS, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    begin, end = tl.load(CU + row), tl.load(CU + row + 1)
    i = tl.arange(0, BLOCK)
    n = tl.sum(tl.zeros([BLOCK], ACC), 0)
    mean, m2 = n, n
    for start in range(begin, end, BLOCK):
        offs = start + i
        inb = offs < end
        valid = (tl.load(M + offs, mask=inb, other=0) != 0) & inb
        x = tl.load(X + offs, mask=inb, other=0).to(ACC)
        nb, mb, m2b = _block_moments(x, valid)
        n, mean, m2 = _chan(n, mean, m2, nb, mb, m2b)
    tl.store(STATS + row * STAT_K + 0, n)
    tl.store(STATS + row * STAT_K + 1, mean)
    tl.store(STATS + row * STAT_K + 2, m2)


@triton.jit
def _normalize_kernel(X, M, OUT, CU, STATS, n_rows, eps, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr,
                      SBLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    j = tl.arange(0, SBLOCK)
    total = tl.sum(tl.zeros([SBLOCK], ACC), 0)
    wsum = total
    for s in range(0, n_rows, SBLOCK):  # pass 1 over the partials: count and mean
        k = s + j
        ok = k < n_rows
        n_k = tl.load(STATS + k * STAT_K + 0, mask=ok, other=0).to(ACC)
        total += tl.sum(n_k, 0)
        wsum += tl.sum(n_k * tl.load(STATS + k * STAT_K + 1, mask=ok, other=0).to(ACC), 0)
    mean = wsum / tl.maximum(total, 1.0)
    m2 = tl.sum(tl.zeros([SBLOCK], ACC), 0)
    for s in range(0, n_rows, SBLOCK):  # pass 2: M2 = sum M2_k + sum n_k (mean_k - mean)^2
        k = s + j
        ok = k < n_rows
        n_k = tl.load(STATS + k * STAT_K + 0, mask=ok, other=0).to(ACC)
        d = tl.load(STATS + k * STAT_K + 1, mask=ok, other=0).to(ACC) - mean
        m2 += tl.sum(tl.load(STATS + k * STAT_K + 2, mask=ok, other=0).to(ACC) + n_k * d * d, 0)
    rstd = 1 / tl.sqrt(m2 / tl.maximum(total - 1, 1.0) + eps)
    begin, end = tl.load(CU + row), tl.load(CU + row + 1)
    i = tl.arange(0, BLOCK)
    for start in range(begin, end, BLOCK):
        offs = start + i
        inb = offs < end
        valid = (tl.load(M + offs, mask=inb, other=0) != 0) & inb
        y = (tl.load(X + offs, mask=inb, other=0).to(ACC) - mean) * rstd
        if not SHIFT_MEAN:
            y += mean
        tl.store(OUT + offs, tl.where(valid, y, 0.0).to(OUT.dtype.element_ty), mask=inb)


def acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def stats_buffer(n_rows: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(n_rows, int(STAT_K), dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                       device=like.device)


def block_for(n: int) -> int:
    return min(max(triton.next_power_of_2(n), 16), 1024)


def normalize(x, mask_u8, out, cu, stats, *, shift_mean: bool, eps: float, block: int = 1024) -> None:
    """Launch 2: whiten the flat buffer `x` (total,) into `out` (may alias x) from per-row partials `stats`."""
    n_rows = cu.numel() - 1
    _normalize_kernel[(n_rows,)](x, mask_u8, out, cu, stats, n_rows, eps, SHIFT_MEAN=shift_mean, BLOCK=block,
                                 SBLOCK=block_for(n_rows), ACC=acc_dtype(x))


def masked_whiten(x, mask, out, *, shift_mean: bool, eps: float) -> None:
    """out = masked whitening of x; x, mask, out: (rows, cols) contiguous (mask any 0/1 dtype)."""
    rows, cols = x.shape
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    cu = torch.arange(rows + 1, device=x.device, dtype=torch.int64) * cols
    stats = stats_buffer(rows, x)
    _row_moments_kernel[(rows,)](x, mask, cu, stats, BLOCK=block_for(cols), ACC=acc_dtype(x))
    normalize(x.view(-1), mask.view(-1), out.view(-1), cu, stats, shift_mean=shift_mean, eps=eps,
              block=block_for(cols))
