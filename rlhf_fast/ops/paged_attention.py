"""Paged KV cache ops: `paged_attention` (decode over block tables, GQA; optional sliding window, logit soft-capping
and attention sinks), `store_kv_cache`, `copy_blocks`.

Kernels see only tensors: the cache `(num_blocks, block_size, KVH, D)`, int32 block tables and context lengths, an
int64 slot mapping. Backends (per call, `rlhf_fast.backend.select`):
  * triton: `rlhf_fast.kernels.paged_attention` / `rlhf_fast.kernels.kv_cache` (CUDA, or CPU under TRITON_INTERPRET=1).
  * native: `rlhf_fast._C.paged_attention_{cpu,cuda}` (csrc/paged_attention.cpp, csrc/cuda/paged_attention.cu), one
    online-softmax pass per (query, kv head) over the keys in block-table order, wrapped in `torch.library.custom_op`
    (called directly in eager CPU code); `store_kv_cache_cpu`, row copies.
  * torch: `rlhf_fast.ops.reference`.
Every backend reduces a query's keys in one fixed order that depends only on that query's context length, so a
row's output does not depend on the batch it is in (what the deterministic rollout mode relies on).
No autograd: these ops serve generation only.
"""
from __future__ import annotations

import torch

from rlhf_fast import _native
from rlhf_fast._native import arg
from rlhf_fast.backend import register_op, select
from rlhf_fast.ops import _checks, reference

register_op("paged_attention", triton=True, native_cpu="paged_attention_cpu", native_cuda="paged_attention_cuda")
register_op("store_kv_cache", triton=True, native_cpu="store_kv_cache_cpu")
register_op("copy_blocks", triton=True)

INDEX_DTYPES = (torch.int32,)


# ---------------------------------------------------------------------------------------------------------------
# Layer 1: the native kernels as custom ops.
# ---------------------------------------------------------------------------------------------------------------

def _call_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, sliding_window: int = 0, softcap: float = 0.0,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Checked, contiguous inputs (see `paged_attention`) -> (B, H, D) in q's dtype. Called directly in eager CPU
    code (no grad, nothing to trace), where the custom-op dispatch costs more than a small decode step's kernel."""
    out = torch.empty_like(q)
    b, h, d = q.shape
    nb, bs, kvh, _ = k_cache.shape
    dt = q.dtype
    sink_ptr = 0
    if sinks is not None:  # on q's device (checked); the kernels read float64 on CPU, float32 on CUDA
        sinks = sinks.to(torch.float32 if q.is_cuda else torch.float64).contiguous()
        sink_ptr = sinks.data_ptr()
    _native.call("paged_attention_cuda" if q.is_cuda else "paged_attention_cpu", arg("out", out, dt),
                 arg("q", q), arg("k_cache", k_cache, dt), arg("v_cache", v_cache, dt),
                 arg("block_tables", block_tables, torch.int32), arg("context_lens", context_lens, torch.int32),
                 b, h, kvh, d, bs, block_tables.shape[1], nb, float(scale), _native.dtype_code(q), int(sliding_window),
                 float(softcap), sink_ptr)
    return out


@torch.library.custom_op("rlhf_fast::paged_attention", mutates_args=())
def _native_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            sliding_window: int = 0, softcap: float = 0.0,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`_call_native` as a custom op (what torch.compile and CUDA code see)."""
    return _call_native(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, softcap, sinks)


@_native_paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=0, softcap=0.0, sinks=None):
    return torch.empty_like(q)


def _native_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """csrc/paged_attention.cpp `store_kv_cache_cpu`: k, v contiguous in the caches' dtype (CPU)."""
    _native.call("store_kv_cache_cpu", arg("k", k), arg("v", v, k.dtype), arg("k_cache", k_cache, k.dtype),
                 arg("v_cache", v_cache, k.dtype), arg("slot_mapping", slot_mapping, torch.int64),
                 k.shape[0], k.shape[1] * k.shape[2] * k.element_size(), k_cache.shape[0] * k_cache.shape[1])


@torch.library.custom_op("rlhf_fast::store_kv_cache", mutates_args=("k_cache", "v_cache"))
def _native_store_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """`_native_store` as a custom op (what torch.compile sees; eager calls skip the dispatch)."""
    _native_store(k, v, k_cache, v_cache, slot_mapping)


@_native_store_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


# ---------------------------------------------------------------------------------------------------------------
# Layer 3: public functions (no autograd layer: inference only).
# ---------------------------------------------------------------------------------------------------------------

def _check_cache(name: str, cache: torch.Tensor, q: torch.Tensor | None = None) -> None:
    _checks.check_float(name, cache, ndim=4)
    if not cache.is_contiguous():
        raise ValueError(f"{name} must be contiguous; got strides {cache.stride()} ({_checks.desc(cache)})")
    if q is not None and cache.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}; got {_checks.desc(cache)}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, *, scale: float | None = None, sliding_window: int = 0,
                    softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query per row over a paged KV cache, grouped-query.

    Args:
        q: (B, H, D) queries (one token per row).
        k_cache, v_cache: (num_blocks, block_size, KVH, D), H divisible by KVH; q's dtype.
        block_tables: (B, max_blocks) int32; row b's token t is in slot t % block_size of block
            block_tables[b, t // block_size]. Entries past the row's context, or before its window, are never read.
        context_lens: (B,) int32 in [1, max_blocks * block_size]: row b's query is its token n - 1 (n =
            context_lens[b]) and attends to its tokens up to itself.
        scale: softmax scale, default D ** -0.5.
        sliding_window: W > 0: only the last W tokens (positions > n - 1 - W, the query's own included), as
            Mistral / Gemma 2 / transformers' `sliding_window_overlay` define it; 0: all.
        softcap: c > 0: scores s -> c * tanh(s / c) before the softmax (Gemma 2's attn_logit_softcapping); 0: none.
        sinks: (H,) float, per-head sink logits (GPT-OSS): each adds exp(sink) to its head's softmax denominator and
            takes no value; None: none.
    Returns:
        (B, H, D) in q's dtype (accumulated in fp32; fp64 for fp64). The defaults compute exactly the plain
        attention (bitwise the same as without these options).
    """
    _checks.check_float("q", q, ndim=3)
    _check_cache("k_cache", k_cache, q)
    _check_cache("v_cache", v_cache, q)
    _checks.check_same_shape(("k_cache", "v_cache"), (k_cache, v_cache))
    _checks.check_tensor("block_tables", block_tables, dtypes=INDEX_DTYPES, ndim=2)
    _checks.check_tensor("context_lens", context_lens, dtypes=INDEX_DTYPES, ndim=1)
    _checks.check_same_device(("q", "k_cache", "v_cache", "block_tables", "context_lens"),
                              (q, k_cache, v_cache, block_tables, context_lens))
    b, h, d = q.shape
    _, bs, kvh, dc = k_cache.shape
    if dc != d or h % kvh:
        raise ValueError(f"k_cache must be (num_blocks, block_size, KVH, {d}) with KVH dividing H={h}; "
                         f"got {_checks.desc(k_cache)}")
    if block_tables.shape[0] != b or context_lens.shape[0] != b:
        raise ValueError(f"block_tables (B, max_blocks) and context_lens (B,) need B={b} rows; got "
                         f"{_checks.desc(block_tables)} and {_checks.desc(context_lens)}")
    scale = d ** -0.5 if scale is None else float(scale)
    sliding_window, softcap = int(sliding_window), float(softcap)
    if sliding_window < 0 or not softcap >= 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = none) and softcap >= 0 (0 = none); got "
                         f"{sliding_window} and {softcap}")
    if sinks is not None:
        _checks.check_float("sinks", sinks, ndim=1)
        _checks.check_same_device(("q", "sinks"), (q, sinks))
        if sinks.shape[0] != h:
            raise ValueError(f"sinks must be (H,) = ({h},); got {_checks.desc(sinks)}")
        sinks = sinks.detach().to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    if b == 0:
        return torch.empty_like(q)
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    opts = (sliding_window, softcap, sinks)
    backend = select("paged_attention", q.device)
    if backend == "native":
        if q.is_cuda or torch.compiler.is_compiling():
            return _native_paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale, *opts)
        return _call_native(q, k_cache, v_cache, block_tables, context_lens, scale, *opts)
    if backend == "triton":
        from rlhf_fast.kernels.paged_attention import paged_attention_fwd

        return paged_attention_fwd(q, k_cache, v_cache, block_tables, context_lens, scale, *opts)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale, *opts)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write this step's k, v (T, KVH, D) into k_cache, v_cache (num_blocks, block_size, KVH, D), in place, at
    slot_mapping (T,) int64 (slot = block * block_size + offset; negative = skip)."""
    _checks.check_float("k", k, ndim=3)
    _checks.check_same_shape(("k", "v"), (k, v))
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    _checks.check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), ndim=1)
    if k.shape[1:] != k_cache.shape[2:] or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"k (T, KVH, D) must match the cache's (KVH, D) {tuple(k_cache.shape[2:])} and "
                         f"slot_mapping (T,); got {_checks.desc(k)} and {_checks.desc(slot_mapping)}")
    backend = select("store_kv_cache", k.device)
    if backend == "triton":
        from rlhf_fast.kernels.kv_cache import store_kv_cache as triton_store

        triton_store(k, v, k_cache, v_cache, slot_mapping)
        return
    if backend == "native" and k_cache.dtype == v_cache.dtype:
        k, v = k.to(k_cache.dtype).contiguous(), v.to(k_cache.dtype).contiguous()  # plain row copies on CPU
        (_native_store_op if torch.compiler.is_compiling() else _native_store)(k, v, k_cache, v_cache,
                                                                               slot_mapping.contiguous())
        return
    reference.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy-on-write: for every layer and K/V, block src[i] is copied over block dst[i], in place.

    kv_cache: (layers, 2, num_blocks, block_size, KVH, D) contiguous; src, dst: (N,) int64, dst distinct from src.
    """
    _checks.check_float("kv_cache", kv_cache, ndim=6)
    _checks.check_tensor("src", src, dtypes=(torch.int64,), ndim=1)
    _checks.check_same_shape(("src", "dst"), (src, dst))
    if src.numel() == 0:
        return
    if select("copy_blocks", kv_cache.device) == "triton":
        from rlhf_fast.kernels.kv_cache import copy_blocks as triton_copy

        triton_copy(kv_cache, src, dst)
        return
    reference.copy_blocks(kv_cache, src, dst)
