"""Triton kernels for log-probabilities straight from hidden states and an lm_head, never materialising (N, V).

Forward (`linear_logprobs_fwd`): each program owns BLOCK_M rows and one of a few vocabulary ranges (more programs
than row tiles alone would give), which it walks in BLOCK_V tiles; a tile of logits is `hidden @ weight[tile].T`
accumulated in fp32 over BLOCK_K slices of H (tl.dot), then folded into a per-row online softmax (running max, sum
of exp, sum of exp * z for the entropy, the label's logit). The ranges' partials are merged in a fixed order.
Backward (`linear_dlogits`): a 2-D grid over (row tiles, vocab tiles) recomputes each logits tile the same way and
writes dlogits for a chunk of rows; the caller turns them into dhidden / dweight / dbias with two matmuls.
Final logit soft-cap (SOFTCAP, Gemma 2/3): each logits tile goes through softcap * tanh(x / softcap) before the
temperature (`soft_cap` of logprobs.py), and dlogits carry its derivative.
Tile sizes depend only on (H, V, dtype), and each row's arithmetic does not involve other rows, so results are
batch-invariant. Autograd lives in rlhf_fast/ops/_linear_triton.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.logprobs import soft_cap, tanh_d


def tiles(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=1, num_stages=1)  # interpreter: small tiles


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """x = hidden[rows] @ weight[cols].T + bias[cols] as fp32 (BLOCK_M, BLOCK_V) (0 past V: callers mask it)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & kmask[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_mask[None, :] & kmask[:, None],
                    other=0.0)  # (BLOCK_K, BLOCK_V)
        if UPCAST:
            # Interpreter (CPU): its tl.dot mishandles 16-bit floats and, being a BLAS call, may round a row
            # differently at different positions in the tile; an explicit product-sum in fp32 does neither.
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, M, V, H, stride_h, stride_w, inv_temp, softcap, V_SPAN,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row tile, vocab split): online softmax over the split's vocab range -> partials (4, splits, M):
    running max m, sum exp(z - m), sum exp(z - m) * (z - m), and z at the label (0 if not in this split)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    row_mask = rows < M
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    v_lo = split * V_SPAN
    v_hi = tl.minimum(v_lo + V_SPAN, V)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, cols < v_hi, H, stride_h, stride_w, HAS_BIAS,
                         IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where((cols < v_hi)[None, :], soft_cap(x, softcap, SOFTCAP) * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = z - m_ref[:, None]
        e = tl.exp(d)
        ed = tl.where(e > 0, e * d, 0.0)
        sc = tl.exp(m - m_ref)
        t = tl.where(s > 0, sc * (t + (m - m_ref) * s), 0.0) + tl.sum(ed, 1)
        s = s * sc + tl.sum(e, 1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
    out = part_ptr + split * M + rows
    plane = n_splits * M
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, t, mask=row_mask)
    tl.store(out + 3 * plane, zy, mask=row_mask)


# Backward, per logits element (z = logits / T, p = softmax(z), E_p[z] = lse - H; derivation in triton-kernels/logprobs.py):
#   dlogits_j = (g (1[j = y] - p_j) - gH p_j (z_j - E_p[z])) / T
# (soft-capped, z = c tanh(x / c) / T: times 1 - tanh^2(x_j / c))
# then dhidden = dlogits @ W, dweight = dlogits^T @ hidden, dbias = sum_rows dlogits (done by the caller).
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, out_ptr, M, V, H,
                    stride_h, stride_w, stride_o, inv_temp, softcap, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    col_mask = cols < V
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w, HAS_BIAS, IEEE,
                     UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
    if SOFTCAP:
        t, dcap = tanh_d(x / softcap)  # as soft_cap computes it
        x = softcap * t
    z = tl.where(col_mask[None, :], x * inv_temp, float("-inf"))
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mean_z = lse - tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(dlogp_ptr + rows, mask=row_mask, other=0.0)
    gh = tl.load(dent_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    centred = tl.where(p > 0, p * (z - mean_z[:, None]), 0.0)
    d = tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - p * g[:, None] - centred * gh[:, None]
    if SOFTCAP:
        d = d * dcap
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (d * inv_temp).to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _common(hidden, weight, bias, softcap):
    assert hidden.stride(1) == 1 and weight.stride(1) == 1 and hidden.dtype == weight.dtype
    assert bias is None or bias.is_contiguous()
    upcast = not hidden.is_cuda
    return dict(HAS_BIAS=bias is not None, IEEE=upcast or hidden.dtype == torch.float32, UPCAST=upcast,
                SOFTCAP=softcap != 0, **tiles(hidden.device))


def vocab_splits(vocab: int, device: torch.device) -> tuple[int, int]:
    """(splits, span): the vocabulary is cut into `splits` ranges of `span` columns (a function of V only)."""
    block_v = tiles(device)["BLOCK_V"]
    n_tiles = triton.cdiv(vocab, block_v)
    splits = min(16 if device.type == "cuda" else 2, n_tiles)
    span = triton.cdiv(n_tiles, splits) * block_v
    return triton.cdiv(vocab, span), span


@triton.jit
def _merge_kernel(part_ptr, logp_ptr, lse_ptr, ent_ptr, M, SPLITS, BLOCK_M: tl.constexpr):
    """Combine the per-split partials (4, SPLITS, M) of BLOCK_M rows, splits in order (batch-invariant)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    plane = SPLITS * M
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for k in range(0, SPLITS):
        mx = tl.maximum(mx, tl.load(part_ptr + k * M + rows, mask=row_mask, other=float("-inf")))
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    for k in range(0, SPLITS):
        off = part_ptr + k * M + rows
        m_k = tl.load(off, mask=row_mask, other=float("-inf"))
        s_k = tl.load(off + plane, mask=row_mask, other=0.0)
        t_k = tl.load(off + 2 * plane, mask=row_mask, other=0.0)
        sc = tl.exp(m_k - ref)
        s += s_k * sc
        t += tl.where(s_k > 0, sc * (t_k + (m_k - ref) * s_k), 0.0)
        zy += tl.load(off + 3 * plane, mask=row_mask, other=0.0)
    lse = mx + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, zy - lse, mask=row_mask)
    tl.store(ent_ptr + rows, tl.log(s) - t / s, mask=row_mask)


def linear_logprobs_fwd(hidden, weight, bias, labels, inv_temp, logp, lse, ent, softcap=0.0) -> None:
    """hidden (M, H) (all rows valid), weight (V, H), bias (V,) | None, labels (M,) int64 -> logp, lse, ent (M,);
    softcap >= 0 (0: off)."""
    (m, width), vocab = hidden.shape, weight.shape[0]
    if m == 0:
        return
    cfg = _common(hidden, weight, bias, softcap)
    splits, span = vocab_splits(vocab, hidden.device)
    part = torch.empty(4, splits, m, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), splits)
    _fwd_kernel[grid](hidden, weight, bias if bias is not None else hidden, labels, part, m, vocab, width,
                      hidden.stride(0), weight.stride(0), float(inv_temp), float(softcap), span, **cfg)
    _merge_kernel[(triton.cdiv(m, 128),)](part, logp, lse, ent, m, splits, BLOCK_M=128)


def linear_dlogits(hidden, weight, bias, labels, lse, ent, dlogp, dent, inv_temp, out, softcap=0.0) -> None:
    """Writes dlogits (M, V) for hidden (M, H) into `out` (M, V) in hidden's dtype."""
    (m, width), vocab = hidden.shape, weight.shape[0]
    if m == 0:
        return
    assert out.shape == (m, vocab) and out.stride(1) == 1
    cfg = _common(hidden, weight, bias, softcap)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](hidden, weight, bias if bias is not None else hidden, labels, lse, ent, dlogp, dent, out, m,
                          vocab, width, hidden.stride(0), weight.stride(0), out.stride(0), float(inv_temp),
                          float(softcap), **cfg)
