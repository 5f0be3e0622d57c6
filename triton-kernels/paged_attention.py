"""Triton paged-attention decode: one program per (row, kv head), keys visited block by block in table order.

For the `group = H // KVH` query heads sharing a kv head, each K/V tile of `block_size` tokens is loaded once and
used by all of them (GQA). Online softmax per head (see csrc/paged_attention_impl.h for the recurrence); the order of
every reduction depends only on the row's context length, so a row's output never depends on its batch.
Options (csrc/paged_attention_impl.h defines them): a sliding window starts the walk at the window's first block and
masks the keys before it (entries of earlier blocks are never read); soft-capping maps scores through c tanh(s / c);
sinks start each head's state at m = sink, denominator 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter has no libdevice): sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _paged_attention_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, sinks_ptr, scale, max_blocks,
                            window, softcap, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, GROUP_P2: tl.constexpr, D_P2: tl.constexpr,
                            BS_P2: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    group: tl.constexpr = H // KVH
    n = tl.load(lens_ptr + row)
    lo = tl.where(window > 0, tl.maximum(n - window, 0), 0)  # first key read (the window's)
    offs_g = tl.arange(0, GROUP_P2)
    offs_d = tl.arange(0, D_P2)
    offs_t = tl.arange(0, BS_P2)
    gmask = offs_g < group
    dmask = offs_d < D
    heads = row * H + kvh * group + offs_g  # (G,)
    q = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=gmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)  # (G, D)
    if HAS_SINKS:  # the sink is in the denominator from the start: exp(sink - m) = 1
        m = tl.load(sinks_ptr + kvh * group + offs_g, mask=gmask, other=0.0).to(ACC)
        denom = tl.full((GROUP_P2,), 1.0, ACC)
    else:
        m = tl.full((GROUP_P2,), float("-inf"), ACC)
        denom = tl.zeros((GROUP_P2,), ACC)  # running softmax denominator
    acc = tl.zeros((GROUP_P2, D_P2), ACC)
    for b in range(lo // BLOCK_SIZE, tl.cdiv(n, BLOCK_SIZE)):
        block = tl.load(tables_ptr + row * max_blocks + b).to(tl.int64)
        t = b * BLOCK_SIZE + offs_t
        tmask = (offs_t < BLOCK_SIZE) & (t < n) & (t >= lo)
        kv_off = ((block * BLOCK_SIZE + offs_t) * KVH + kvh) * D  # (BS,)
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kvmask, other=0.0).to(ACC)  # (BS, D)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kvmask, other=0.0).to(ACC)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, BS)
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])  # (G, BS)
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (G, D)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + heads[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])


def paged_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float, sliding_window: int = 0, softcap: float = 0.0,
                        sinks: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D); caches (num_blocks, block_size, KVH, D); block_tables (B, max_blocks) int32; context_lens (B,)
    int32; sliding_window (0 = none), softcap (0 = none), sinks (H,) in the accumulator's dtype or None -> out
    (B, H, D) (allocated unless given). Inputs checked by `rlhf_fast.ops.paged_attention`; strides asserted here."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.is_contiguous() and context_lens.is_contiguous()
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.is_contiguous()
    assert sinks is None or (sinks.shape == (h,) and sinks.is_contiguous())
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    _paged_attention_kernel[(b, kvh)](
        out, q, k_cache, v_cache, block_tables, context_lens, q if sinks is None else sinks, scale,
        block_tables.shape[1], int(sliding_window), float(softcap), H=h, KVH=kvh, D=d, BLOCK_SIZE=bs,
        GROUP_P2=triton.next_power_of_2(h // kvh), D_P2=triton.next_power_of_2(d), BS_P2=triton.next_power_of_2(bs),
        ACC=acc, SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None)
    return out
