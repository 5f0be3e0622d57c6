"""Triton kernels for the KL estimators and the PPO policy / value losses (forward partial sums and backward).

The loss kernels run on a (rows, chunks) grid: each program reads one BLOCK of one row and writes a row of
partial sums (loss, valid count, clipped count, ...) to a small (rows, chunks, K) buffer; the Python side reduces
that buffer (a few hundred numbers) into the loss and its stats, so every aggregation mode costs the same single
pass. The backward kernel recomputes the per-token derivative from the inputs and scales it by a per-row weight
(d loss / d l_{b,t}, which depends only on the aggregation mode and the row's valid count).
Math is done in float32 (float64 for float64 inputs); `expm1` is evaluated with a short series near 0.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from rlhf_fast.kernels import loss_layout as L

# Globals read inside kernels must be tl.constexpr. The partial-sum layouts are defined once, as plain ints, in
# the leaf module rlhf_fast.kernels.loss_layout (the native CPU kernels write the same layout).
LOG_RATIO_CLAMP = tl.constexpr(L.LOG_RATIO_CLAMP)
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
BLOCK_ELEMWISE = 1024
P_LOSS, P_COUNT, P_CLIPPED, P_KL = tl.constexpr(L.P_LOSS), tl.constexpr(L.P_COUNT), tl.constexpr(L.P_CLIPPED), \
    tl.constexpr(L.P_KL)
P_RATIO, P_RMIN, P_RMAX = tl.constexpr(L.P_RATIO), tl.constexpr(L.P_RMIN), tl.constexpr(L.P_RMAX)
P_NONFINITE, P_K = tl.constexpr(L.P_NONFINITE), tl.constexpr(L.P_K)
V_LOSS, V_COUNT, V_CLIPPED, V_VSUM = tl.constexpr(L.V_LOSS), tl.constexpr(L.V_COUNT), tl.constexpr(L.V_CLIPPED), \
    tl.constexpr(L.V_VSUM)
V_NONFINITE, V_RMEAN, V_RM2 = tl.constexpr(L.V_NONFINITE), tl.constexpr(L.V_RMEAN), tl.constexpr(L.V_RM2)
V_EMEAN, V_EM2, V_K = tl.constexpr(L.V_EMEAN), tl.constexpr(L.V_EM2), tl.constexpr(L.V_K)


@triton.jit
def _expm1(x):
    """e^x - 1 without cancellation: Horner series for |x| < 0.1 (error < 1e-15 relative), exp(x) - 1 beyond."""
    s = 1 + x / 8
    s = 1 + x / 7 * s
    s = 1 + x / 6 * s
    s = 1 + x / 5 * s
    s = 1 + x / 4 * s
    s = 1 + x / 3 * s
    s = 1 + x / 2 * s
    return tl.where(tl.abs(x) < 0.1, x * s, tl.exp(x) - 1)


@triton.jit
def _expm1_minus_x(x):
    """e^x - 1 - x (>= 0), the k3 / approx-KL kernel, by series near 0 as in `_expm1`."""
    s = 1 + x / 9
    s = 1 + x / 8 * s
    s = 1 + x / 7 * s
    s = 1 + x / 6 * s
    s = 1 + x / 5 * s
    s = 1 + x / 4 * s
    s = 1 + x / 3 * s
    return tl.where(tl.abs(x) < 0.1, x * x / 2 * s, tl.exp(x) - 1 - x)


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")  # False for NaN and +-Inf


# --- KL: k = f(lr), lr = clamp(logp - ref, -20, 20); dk/dlogp = f'(lr) [|logp - ref| <= 20], dk/dref = -that.
#     f' : k1 -> 1, k2 -> lr, k3 -> 1 - e^{-lr} = -expm1(-lr), abs -> sign(lr). A NaN log ratio gives k = NaN and a
#     zero gradient (the [|raw| <= 20] factor is false for NaN), an infinite one is clamped: as the torch reference.
@triton.jit
def _kl_fwd_kernel(LOGP, REF, OUT, n, KIND: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    raw = tl.load(LOGP + offs, mask=inb, other=0).to(ACC) - tl.load(REF + offs, mask=inb, other=0).to(ACC)
    lr = tl.minimum(tl.maximum(raw, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    lr = tl.where(raw != raw, raw, lr)  # a NaN log ratio stays NaN (tl.maximum would return the bound), as in torch
    if KIND == 0:
        k = lr
    elif KIND == 1:
        k = 0.5 * lr * lr
    elif KIND == 2:
        k = _expm1_minus_x(-lr)
    else:
        k = tl.abs(lr)
    tl.store(OUT + offs, k.to(OUT.dtype.element_ty), mask=inb)


@triton.jit
def _kl_bwd_kernel(LOGP, REF, G, DLR, n, KIND: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    raw = tl.load(LOGP + offs, mask=inb, other=0).to(ACC) - tl.load(REF + offs, mask=inb, other=0).to(ACC)
    lr = tl.minimum(tl.maximum(raw, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    if KIND == 0:
        d = tl.full(lr.shape, 1, ACC)
    elif KIND == 1:
        d = lr
    elif KIND == 2:
        d = -_expm1(-lr)
    else:
        d = tl.where(lr > 0, 1.0, tl.where(lr < 0, -1.0, 0.0)).to(ACC)
    g = tl.load(G + offs, mask=inb, other=0).to(ACC)
    d = tl.where(tl.abs(raw) <= LOG_RATIO_CLAMP, d * g, 0.0)
    tl.store(DLR + offs, d.to(DLR.dtype.element_ty), mask=inb)


def split_f64(x: float) -> tuple[float, float]:
    """x as hi + lo float32 halves: Triton passes Python floats as float32; hi + lo restores ~48 bits."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    zero = tl.sum(tl.zeros([2], ACC), 0)  # a 0-d ACC scalar: promotes hi and lo (float32 or Python floats)
    return (zero + hi) + lo


def _acc(*ts: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in ts) else tl.float32


def kl_forward(logp, ref_logp, out, kind: str) -> None:
    """out = kl(logp, ref_logp), all contiguous, same shape."""
    n = logp.numel()
    _kl_fwd_kernel[(triton.cdiv(n, BLOCK_ELEMWISE),)](logp, ref_logp, out, n, KIND=KL_CODES[kind],
                                                      BLOCK=BLOCK_ELEMWISE, ACC=_acc(logp, ref_logp))


def kl_backward(logp, ref_logp, grad_out, dlr, kind: str) -> None:
    """dlr = grad_out * d kl / d logp (= -d kl / d ref_logp), all contiguous, same shape."""
    n = logp.numel()
    _kl_bwd_kernel[(triton.cdiv(n, BLOCK_ELEMWISE),)](logp, ref_logp, grad_out, dlr, n, KIND=KL_CODES[kind],
                                                      BLOCK=BLOCK_ELEMWISE, ACC=_acc(logp, ref_logp, dlr))


# --- Policy loss. r = exp(clamp(lr)), pg1 = -A r, pg2 = -A clip(r, 1 - lo, 1 + hi), l = max(pg1, pg2), and for
#     A < 0 with a dual clip c: l = min(l, -c A); with importance weights l *= w_is. dl/dlogp = -A r (* w_is) where
#     l = pg1 (and |lr| <= 20), else 0 (the clipped branches are constant in logp). lr = logp - old_logp, or with
#     LR_GIVEN the OLD input is lr itself (the sequence level's per-token broadcast of sg[mean lr]).
@triton.jit
def _policy_token(LOGP, OLD, ADV, ISW, MASK, offs, inb, lower, upper, dual, HAS_DUAL: tl.constexpr,
                  HAS_IS: tl.constexpr, LR_GIVEN: tl.constexpr, ACC: tl.constexpr):
    """Per-token policy loss terms; lower, upper = 1 - clip_low, 1 + clip_high."""
    lp = tl.load(LOGP + offs, mask=inb, other=0).to(ACC)
    old = tl.load(OLD + offs, mask=inb, other=0).to(ACC)
    adv = tl.load(ADV + offs, mask=inb, other=0).to(ACC)
    m = tl.load(MASK + offs, mask=inb, other=0) != 0
    finite = _finite(lp) & _finite(old) & _finite(adv)
    if HAS_IS:
        isw = tl.load(ISW + offs, mask=inb, other=0).to(ACC)
        finite = finite & _finite(isw)
    valid = m & finite
    if LR_GIVEN:
        raw = tl.where(valid, old, 0.0)
    else:
        raw = tl.where(valid, lp - old, 0.0)
    lr = tl.minimum(tl.maximum(raw, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    adv = tl.where(valid, adv, 0.0)
    ratio = tl.exp(lr)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lower), upper)
    tok = tl.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if HAS_DUAL:
        pg3 = -adv * dual
        dual_on = (adv < 0) & (pg3 < tok)
        tok = tl.where(dual_on, pg3, tok)
        clipped = clipped | dual_on
    grad = tl.where(valid & ~clipped & (tl.abs(raw) <= LOG_RATIO_CLAMP), -adv * ratio, 0.0)
    if HAS_IS:
        isw = tl.where(valid, isw, 0.0)
        tok = tok * isw
        grad = grad * isw
    return valid, m & ~finite, lr, ratio, tok, clipped, grad


@triton.jit
def _policy_fwd_kernel(LOGP, OLD, ADV, ISW, MASK, PART, T, n_chunks, lo_hi, lo_lo, hi_hi, hi_lo, dual_hi, dual_lo,
                       HAS_DUAL: tl.constexpr, HAS_IS: tl.constexpr, LR_GIVEN: tl.constexpr, BLOCK: tl.constexpr,
                       ACC: tl.constexpr):
    lower, upper, dual = _join(lo_hi, lo_lo, ACC), _join(hi_hi, hi_lo, ACC), _join(dual_hi, dual_lo, ACC)
    row, c = tl.program_id(0), tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    inb = cols < T
    offs = row.to(tl.int64) * T + cols
    valid, bad, lr, ratio, tok, clipped, _ = _policy_token(LOGP, OLD, ADV, ISW, MASK, offs, inb, lower, upper,
                                                           dual, HAS_DUAL, HAS_IS, LR_GIVEN, ACC)
    out = PART + (row.to(tl.int64) * n_chunks + c) * P_K
    tl.store(out + P_LOSS, tl.sum(tl.where(valid, tok, 0.0), 0))
    tl.store(out + P_COUNT, tl.sum(valid.to(ACC), 0))
    tl.store(out + P_CLIPPED, tl.sum((valid & clipped).to(ACC), 0))
    tl.store(out + P_KL, tl.sum(tl.where(valid, _expm1_minus_x(lr), 0.0), 0))
    tl.store(out + P_RATIO, tl.sum(tl.where(valid, ratio, 0.0), 0))
    tl.store(out + P_RMIN, tl.min(tl.where(valid, ratio, float("inf")), 0))
    tl.store(out + P_RMAX, tl.max(tl.where(valid, ratio, -float("inf")), 0))
    tl.store(out + P_NONFINITE, tl.sum(bad.to(ACC), 0))


@triton.jit
def _policy_bwd_kernel(LOGP, OLD, ADV, ISW, MASK, W, GRAD, T, lo_hi, lo_lo, hi_hi, hi_lo, dual_hi, dual_lo,
                       HAS_DUAL: tl.constexpr, HAS_IS: tl.constexpr, LR_GIVEN: tl.constexpr, BLOCK: tl.constexpr,
                       ACC: tl.constexpr):
    lower, upper, dual = _join(lo_hi, lo_lo, ACC), _join(hi_hi, hi_lo, ACC), _join(dual_hi, dual_lo, ACC)
    row, c = tl.program_id(0), tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    inb = cols < T
    offs = row.to(tl.int64) * T + cols
    _, _, _, _, _, _, grad = _policy_token(LOGP, OLD, ADV, ISW, MASK, offs, inb, lower, upper, dual, HAS_DUAL,
                                         HAS_IS, LR_GIVEN, ACC)
    w = tl.load(W + row).to(ACC)
    tl.store(GRAD + offs, (grad * w).to(GRAD.dtype.element_ty), mask=inb)


def _block(T: int) -> int:
    return min(max(triton.next_power_of_2(T), 16), 1024)


def _clip_args(clip) -> tuple[float, ...]:
    return (*split_f64(clip.lower), *split_f64(clip.upper), *split_f64(clip.dual or 0.0))


def policy_partials(logp, old_logp, adv, mask, clip, part=None, *, is_weights=None, lr_given: bool = False):
    """(rows, chunks, P_K) partial sums of the policy loss; inputs (rows, T) contiguous, mask uint8/int/float;
    clip: a `PPOClip` (read through its lower / upper bounds and dual); is_weights: (rows, T) or None;
    lr_given: `old_logp` holds the log ratio itself."""
    rows, T = logp.shape
    block = _block(T)
    n_chunks = triton.cdiv(T, block)
    acc = _acc(logp, old_logp, adv)
    if part is None:  # tests pass a NaN-filled buffer to check every partial is written
        part = torch.empty(rows, n_chunks, L.P_K, dtype=torch.float64 if acc == tl.float64 else torch.float32,
                           device=logp.device)
    isw = logp if is_weights is None else is_weights  # never read without HAS_IS
    _policy_fwd_kernel[(rows, n_chunks)](logp, old_logp, adv, isw, mask, part, T, n_chunks, *_clip_args(clip),
                                         HAS_DUAL=clip.dual is not None, HAS_IS=is_weights is not None,
                                         LR_GIVEN=lr_given, BLOCK=block, ACC=acc)
    return part


def policy_backward(logp, old_logp, adv, mask, row_weight, grad, clip, *, is_weights=None,
                    lr_given: bool = False) -> None:
    """grad = row_weight[:, None] * d l / d logp, (rows, T)."""
    rows, T = logp.shape
    block = _block(T)
    isw = logp if is_weights is None else is_weights
    _policy_bwd_kernel[(rows, triton.cdiv(T, block))](logp, old_logp, adv, isw, mask, row_weight, grad, T,
                                                      *_clip_args(clip), HAS_DUAL=clip.dual is not None,
                                                      HAS_IS=is_weights is not None, LR_GIVEN=lr_given,
                                                      BLOCK=block, ACC=_acc(logp, old_logp, adv))


# --- Value loss. vc = v_old + clamp(v - v_old, -c, c), l1 = (v - R)^2, l2 = (vc - R)^2, l = max(l1, l2) / 2.
#     dl/dv = v - R where l1 >= l2; (vc - R) where l2 > l1 and |v - v_old| <= c (vc moves with v); else 0.
@triton.jit
def _value_token(V, VOLD, RET, MASK, offs, inb, clip_hi, clip_lo, HAS_CLIP: tl.constexpr, ACC: tl.constexpr):
    v = tl.load(V + offs, mask=inb, other=0).to(ACC)
    vo = tl.load(VOLD + offs, mask=inb, other=0).to(ACC)
    ret = tl.load(RET + offs, mask=inb, other=0).to(ACC)
    m = tl.load(MASK + offs, mask=inb, other=0) != 0
    clip = _join(clip_hi, clip_lo, ACC)
    finite = _finite(v) & _finite(vo) & _finite(ret)
    valid = m & finite
    v = tl.where(valid, v, 0.0)
    vo = tl.where(valid, vo, 0.0)
    ret = tl.where(valid, ret, 0.0)
    l1 = (v - ret) * (v - ret)
    if HAS_CLIP:
        inside = tl.abs(v - vo) <= clip
        vc = vo + tl.minimum(tl.maximum(v - vo, -clip), clip)
        l2 = (vc - ret) * (vc - ret)
        tok = 0.5 * tl.maximum(l1, l2)
        clipped = (l2 > l1) & ~inside
        grad = tl.where(l1 >= l2, v - ret, tl.where(inside, vc - ret, 0.0))
    else:
        tok = 0.5 * l1
        clipped = l1 < 0  # all False
        grad = v - ret
    grad = tl.where(valid, grad, 0.0)
    return valid, m & ~finite, v, ret, tok, clipped, grad


@triton.jit
def _value_fwd_kernel(V, VOLD, RET, MASK, PART, T, n_chunks, clip_hi, clip_lo, HAS_CLIP: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    row, c = tl.program_id(0), tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    inb = cols < T
    offs = row.to(tl.int64) * T + cols
    valid, bad, v, ret, tok, clipped, _ = _value_token(V, VOLD, RET, MASK, offs, inb, clip_hi, clip_lo, HAS_CLIP, ACC)
    n = tl.sum(valid.to(ACC), 0)
    inv = 1 / tl.maximum(n, 1.0)
    r_mean = tl.sum(ret, 0) * inv  # ret, v are 0 where not valid
    e = ret - v
    e_mean = tl.sum(e, 0) * inv
    out = PART + (row.to(tl.int64) * n_chunks + c) * V_K
    tl.store(out + V_LOSS, tl.sum(tl.where(valid, tok, 0.0), 0))
    tl.store(out + V_COUNT, n)
    tl.store(out + V_CLIPPED, tl.sum((valid & clipped).to(ACC), 0))
    tl.store(out + V_VSUM, tl.sum(v, 0))
    tl.store(out + V_NONFINITE, tl.sum(bad.to(ACC), 0))
    tl.store(out + V_RMEAN, r_mean)
    tl.store(out + V_RM2, tl.sum(tl.where(valid, (ret - r_mean) * (ret - r_mean), 0.0), 0))
    tl.store(out + V_EMEAN, e_mean)
    tl.store(out + V_EM2, tl.sum(tl.where(valid, (e - e_mean) * (e - e_mean), 0.0), 0))


@triton.jit
def _value_bwd_kernel(V, VOLD, RET, MASK, W, GRAD, T, clip_hi, clip_lo, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
                      ACC: tl.constexpr):
    row, c = tl.program_id(0), tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    inb = cols < T
    offs = row.to(tl.int64) * T + cols
    _, _, _, _, _, _, grad = _value_token(V, VOLD, RET, MASK, offs, inb, clip_hi, clip_lo, HAS_CLIP, ACC)
    w = tl.load(W + row).to(ACC)
    tl.store(GRAD + offs, (grad * w).to(GRAD.dtype.element_ty), mask=inb)


def value_partials(values, old_values, returns, mask, clip: float | None, part=None):
    """(rows, chunks, V_K) partial sums of the value loss; inputs (rows, T) contiguous."""
    rows, T = values.shape
    block = _block(T)
    n_chunks = triton.cdiv(T, block)
    acc = _acc(values, old_values, returns)
    if part is None:  # tests pass a NaN-filled buffer to check every partial is written
        part = torch.empty(rows, n_chunks, L.V_K, dtype=torch.float64 if acc == tl.float64 else torch.float32,
                           device=values.device)
    _value_fwd_kernel[(rows, n_chunks)](values, old_values, returns, mask, part, T, n_chunks, *split_f64(clip or 0.0),
                                        HAS_CLIP=clip is not None, BLOCK=block, ACC=acc)
    return part


def value_backward(values, old_values, returns, mask, row_weight, grad, clip: float | None) -> None:
    """grad = row_weight[:, None] * d l / d values, (rows, T)."""
    rows, T = values.shape
    block = _block(T)
    _value_bwd_kernel[(rows, triton.cdiv(T, block))](values, old_values, returns, mask, row_weight, grad, T,
                                                     *split_f64(clip or 0.0), HAS_CLIP=clip is not None, BLOCK=block,
                                                     ACC=_acc(values, old_values, returns))
