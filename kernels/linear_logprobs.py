"""Triton kernels for log-probabilities straight from hidden states and an lm_head, never materialising (N, V).

Forward (`linear_logprobs_fwd`): each program owns BLOCK_M rows and walks the vocabulary in BLOCK_V tiles; a tile of
logits is `hidden @ weight[tile].T` accumulated in fp32 over BLOCK_K slices of H (tl.dot), then folded into a
per-row online softmax (running max, sum of exp, sum of exp * z for the entropy, and the label's logit).
Backward (`linear_dlogits`): a 2-D grid over (row tiles, vocab tiles) recomputes each logits tile the same way and
writes dlogits for a chunk of rows; the caller turns them into dhidden / dweight / dbias with two matmuls.
Tile sizes depend only on (H, V, dtype), and each row's arithmetic does not involve other rows, so results are
batch-invariant. Autograd lives in rlhf_fast/ops/_linear_triton.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def tiles(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=1, num_stages=1)  # interpreter: small tiles


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w, inv_temp,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) * inv_temp as fp32 (BLOCK_M, BLOCK_V); -inf past V."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & kmask[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_mask[None, :] & kmask[:, None],
                    other=0.0)  # (BLOCK_K, BLOCK_V)
        if UPCAST:  # the interpreter's tl.dot mishandles 16-bit floats
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr, M, V, H, stride_h, stride_w, inv_temp,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(z - m)
    t = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(z - m) * (z - m)
    zy = tl.zeros((BLOCK_M,), tl.float32)  # z at the label
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, cols < V, H, stride_h, stride_w, inv_temp,
                         HAS_BIAS, IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
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
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, zy - lse, mask=row_mask)
    tl.store(ent_ptr + rows, tl.log(s) - t / s, mask=row_mask)


# Backward, per logits element (z = logits / T, p = softmax(z), E_p[z] = lse - H; derivation in kernels/logprobs.py):
#   dlogits_j = (g (1[j = y] - p_j) - gH p_j (z_j - E_p[z])) / T
# then dhidden = dlogits @ W, dweight = dlogits^T @ hidden, dbias = sum_rows dlogits (done by the caller).
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, out_ptr, M, V, H,
                    stride_h, stride_w, stride_o, inv_temp, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    col_mask = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w, inv_temp,
                     HAS_BIAS, IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mean_z = lse - tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(dlogp_ptr + rows, mask=row_mask, other=0.0)
    gh = tl.load(dent_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    centred = tl.where(p > 0, p * (z - mean_z[:, None]), 0.0)
    d = tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - p * g[:, None] - centred * gh[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (d * inv_temp).to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _common(hidden, weight, bias):
    assert hidden.stride(1) == 1 and weight.stride(1) == 1 and hidden.dtype == weight.dtype
    assert bias is None or bias.is_contiguous()
    upcast = not hidden.is_cuda
    return dict(HAS_BIAS=bias is not None, IEEE=upcast or hidden.dtype == torch.float32, UPCAST=upcast,
                **tiles(hidden.device))


def linear_logprobs_fwd(hidden, weight, bias, labels, inv_temp, logp, lse, ent) -> None:
    """hidden (M, H) (all rows valid), weight (V, H), bias (V,) | None, labels (M,) int64 -> logp, lse, ent (M,)."""
    (m, width), vocab = hidden.shape, weight.shape[0]
    if m == 0:
        return
    cfg = _common(hidden, weight, bias)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _fwd_kernel[grid](hidden, weight, bias if bias is not None else hidden, labels, logp, lse, ent, m, vocab, width,
                      hidden.stride(0), weight.stride(0), float(inv_temp), **cfg)


def linear_dlogits(hidden, weight, bias, labels, lse, ent, dlogp, dent, inv_temp, out) -> None:
    """Writes dlogits (M, V) for hidden (M, H) into `out` (M, V) in hidden's dtype."""
    (m, width), vocab = hidden.shape, weight.shape[0]
    if m == 0:
        return
    assert out.shape == (m, vocab) and out.stride(1) == 1
    cfg = _common(hidden, weight, bias)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](hidden, weight, bias if bias is not None else hidden, labels, lse, ent, dlogp, dent, out, m,
                          vocab, width, hidden.stride(0), weight.stride(0), out.stride(0), float(inv_temp), **cfg)
