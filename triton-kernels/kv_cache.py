"""Triton KV-cache writes: store this step's K/V by slot mapping, and copy whole blocks (copy-on-write)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, ROW: tl.constexpr, ROW_P2: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + i)
    if slot >= 0:  # negative slot: a padding token, nothing to store
        offs = tl.arange(0, ROW_P2)
        mask = offs < ROW
        k = tl.load(k_ptr + i * ROW + offs, mask=mask)
        v = tl.load(v_ptr + i * ROW + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v (T, KVH, D) -> caches (num_blocks, block_size, KVH, D) at slot_mapping (T,) int64, in place."""
    t = k.shape[0]
    row = k.shape[1] * k.shape[2]
    k, v = k.contiguous(), v.contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.stride(1) == row
    if t:
        _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, ROW=row, ROW_P2=triton.next_power_of_2(row))


@triton.jit
def _copy_blocks_kernel(cache_ptr, src_ptr, dst_ptr, planes_stride, BLOCK_NUMEL: tl.constexpr, TILE: tl.constexpr):
    pair = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)  # layer * 2 + (K or V)
    src = tl.load(src_ptr + pair)
    dst = tl.load(dst_ptr + pair)
    base = cache_ptr + plane * planes_stride
    for start in range(0, BLOCK_NUMEL, TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < BLOCK_NUMEL
        x = tl.load(base + src * BLOCK_NUMEL + offs, mask=mask)
        tl.store(base + dst * BLOCK_NUMEL + offs, x, mask=mask)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """kv_cache (layers, 2, num_blocks, block_size, KVH, D): block src[i] copied over dst[i] in every plane."""
    assert kv_cache.is_contiguous()
    layers, two, nb = kv_cache.shape[:3]
    block_numel = kv_cache[0, 0, 0].numel()
    _copy_blocks_kernel[(src.numel(), layers * two)](kv_cache, src, dst, nb * block_numel, BLOCK_NUMEL=block_numel,
                                                    TILE=min(1024, triton.next_power_of_2(block_numel)))
