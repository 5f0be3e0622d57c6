"""Paged-attention decode and KV-cache writes (Triton under the interpreter, native C++, torch) vs float64."""
import pytest
import torch

from conftest import tol
from rlhf_fast import _native, ops
from rlhf_fast.backend import use_backend
from rlhf_fast.ops import reference

BS = 16
LENS = [1, 16, 17, 100, 257, 33]  # block edges, a long row, a single token


def case(heads, kv_heads, dtype, lens=LENS, d=24, bs=BS, seed=0):
    """Random queries and caches; each row's blocks are a random sample of the pool (tables padded with junk ids)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // bs)
    nb = len(lens) * max_blocks + 3
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    k = torch.randn(nb, bs, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(nb, bs, kv_heads, d, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(nb, generator=g)[:max_blocks] for _ in lens]).to(torch.int32)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


def dense_fp64(q, k, v, tables, lens, scale, window=0, softcap=0.0, sinks=None):
    """Dense attention written independently of the kernels: gather each row's keys, repeat kv heads, mask the keys
    outside the window (key t of a query at n - 1 is kept when t > n - 1 - window, as transformers'
    `sliding_window_overlay`), cap the scores (Gemma 2), append each head's sink logit (GPT-OSS), softmax, drop it."""
    out = []
    h, kvh = q.shape[1], k.shape[2]
    for b, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        keep = t > n - 1 - window if window else torch.ones(n, dtype=torch.bool)
        t = t[keep]
        blocks = tables[b, t // k.shape[1]].long()
        kk = k[blocks, t % k.shape[1]].double().repeat_interleave(h // kvh, dim=1)  # (n', H, D)
        vv = v[blocks, t % k.shape[1]].double().repeat_interleave(h // kvh, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), kk) * scale  # (H, n')
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if sinks is not None:
            s = torch.cat((s, sinks.double()[:, None]), 1)  # (H, n' + 1)
        w = torch.softmax(s, dim=-1)[:, :len(t)]
        out.append(torch.einsum("hn,nhd->hd", w, vv))
    return torch.stack(out)


def poisoned_native(q, k, v, tables, lens, scale, window=0, softcap=0.0, sinks=None):
    out = torch.full_like(q, float("nan"))
    sinks = None if sinks is None else sinks.double().contiguous()
    _native.fn("paged_attention_cpu")(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(),
                                      lens.data_ptr(), q.shape[0], q.shape[1], k.shape[2], q.shape[2], k.shape[1],
                                      tables.shape[1], k.shape[0], scale, _native.dtype_code(q), window, softcap,
                                      0 if sinks is None else sinks.data_ptr())
    return out


def poisoned_triton(q, k, v, tables, lens, scale, window=0, softcap=0.0, sinks=None):
    from rlhf_fast.kernels.paged_attention import paged_attention_fwd

    if sinks is not None:
        sinks = sinks.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return paged_attention_fwd(q, k, v, tables, lens, scale, window, softcap, sinks,
                               out=torch.full_like(q, float("nan")))


def poisoned_torch(q, k, v, tables, lens, scale, window=0, softcap=0.0, sinks=None):
    return reference.paged_attention(q, k, v, tables, lens, scale, window, softcap, sinks)


KERNELS = {"native": poisoned_native, "triton": poisoned_triton, "torch": poisoned_torch}
needs_native = pytest.mark.skipif(not _native.has("paged_attention_cpu"), reason="native extension not built")


def _run(kernel, *args):
    if kernel == "native" and not _native.has("paged_attention_cpu"):
        pytest.skip("native extension not built")
    return KERNELS[kernel](*args)


@pytest.mark.parametrize("kernel", ["native", "triton"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_matches_dense_fp64_fp32(kernel, heads, kv_heads):
    q, k, v, tables, lens = case(heads, kv_heads, torch.float32)
    scale = q.shape[-1] ** -0.5
    out = _run(kernel, q, k, v, tables, lens, scale)
    ref = dense_fp64(q, k, v, tables, lens, scale)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    torch.testing.assert_close(reference.paged_attention(q.double(), k.double(), v.double(), tables, lens, scale),
                               ref, **tol(torch.float64))


@pytest.mark.parametrize("kernel", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_matches_dense_fp64_other_dtypes(kernel, dtype):
    q, k, v, tables, lens = case(6, 2, dtype, lens=[1, 5, 40, 97], d=20, bs=8)
    scale = 0.3
    out = _run(kernel, q, k, v, tables, lens, scale)
    assert out.dtype == dtype
    ref = dense_fp64(q, k, v, tables, lens, scale)
    # within ~2x of what plain PyTorch in this dtype gets (its own rounding of the output dominates)
    torch_err = (reference.paged_attention(q, k, v, tables, lens, scale).double() - ref).abs().max()
    err = (out.double() - ref).abs().max()
    assert err <= 2 * torch_err + tol(dtype)["atol"], (err, torch_err)


def test_every_context_length_native():
    lens = list(range(1, 258))
    q, k, v, tables, lens_t = case(8, 2, torch.float32, lens=lens, d=16)
    if not _native.has("paged_attention_cpu"):
        pytest.skip("native extension not built")
    out = poisoned_native(q, k, v, tables, lens_t, 0.25)
    torch.testing.assert_close(out.double(), dense_fp64(q, k, v, tables, lens_t, 0.25), **tol(torch.float32))


@needs_native
@pytest.mark.parametrize("d,bs,heads,kv_heads", [(32, 16, 8, 2), (64, 5, 4, 2), (128, 16, 3, 3), (64, 16, 8, 1)])
def test_native_fp32_wide_heads(d, bs, heads, kv_heads):
    """head_dim % 32 == 0: the AVX2 path on CPUs that have it; every context length, odd block sizes and groups."""
    lens = list(range(1, 131, 3)) + [bs, bs + 1, 2 * bs - 1]
    q, k, v, tables, lens_t = case(heads, kv_heads, torch.float32, lens=lens, d=d, bs=bs, seed=d + bs)
    out = poisoned_native(q, k, v, tables, lens_t, d ** -0.5)
    torch.testing.assert_close(out.double(), dense_fp64(q, k, v, tables, lens_t, d ** -0.5), **tol(torch.float32))
    for i in (0, 7, len(lens) - 1):
        alone = poisoned_native(q[i:i + 1], k, v, tables[i:i + 1], lens_t[i:i + 1], d ** -0.5)
        assert torch.equal(alone[0], out[i])


@pytest.mark.parametrize("kernel", ["native", "triton", "torch"])
def test_rows_are_batch_invariant(kernel):
    q, k, v, tables, lens = case(8, 2, torch.float32)
    if kernel == "torch":
        run = lambda *a: reference.paged_attention(*a)  # noqa: E731
    else:
        run = lambda *a: _run(kernel, *a)  # noqa: E731
    full = run(q, k, v, tables, lens, 0.2)
    for i in (0, 4):
        alone = run(q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1], 0.2)
        assert torch.equal(alone[0], full[i])


def test_public_op_dispatch_and_errors():
    q, k, v, tables, lens = case(4, 2, torch.float32, lens=[3, 20])
    ref = dense_fp64(q, k, v, tables, lens, 0.5)
    for backend in ["torch", "triton"] + (["native"] if _native.has("paged_attention_cpu") else []):
        with use_backend(backend):
            torch.testing.assert_close(ops.paged_attention(q, k, v, tables, lens, scale=0.5).double(), ref,
                                       **tol(torch.float32))
    with pytest.raises(TypeError, match="block_tables"):
        ops.paged_attention(q, k, v, tables.long(), lens)
    with pytest.raises(ValueError, match="KVH dividing"):
        ops.paged_attention(q[:, :3], k, v, tables, lens)
    with pytest.raises(TypeError, match="k_cache"):
        ops.paged_attention(q, k.double(), v, tables, lens)
    with pytest.raises(ValueError, match="B=2"):
        ops.paged_attention(q, k, v, tables[:1], lens)


@needs_native
def test_native_rejects_bad_tables():
    q, k, v, tables, lens = case(4, 2, torch.float32, lens=[3, 20])
    with use_backend("native"):
        with pytest.raises(ValueError, match="context_lens"):
            ops.paged_attention(q, k, v, tables, torch.tensor([0, 3], dtype=torch.int32))
        bad = tables.clone()
        bad[1, 1] = k.shape[0]
        with pytest.raises(ValueError, match="block_tables"):
            ops.paged_attention(q, k, v, bad, lens)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_store_kv_cache_native(dtype):
    nb, bs, kvh, d = 7, 4, 3, 5
    k_cache = torch.full((nb, bs, kvh, d), float("nan"), dtype=dtype)
    v_cache = torch.full((nb, bs, kvh, d), float("nan"), dtype=dtype)
    k, v = torch.randn(6, kvh, d), torch.randn(6, kvh, 2 * d)[..., ::2]  # float32 into any dtype; v strided
    slots = torch.tensor([0, 5, 27, -1, 13, 14])
    with use_backend("native"):
        ops.store_kv_cache(k, v, k_cache, v_cache, slots)
        with pytest.raises(ValueError, match="outside the cache"):
            ops.store_kv_cache(k, v, k_cache, v_cache, torch.tensor([0, 1, 2, 3, 4, nb * bs]))
    keep = slots >= 0
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    assert torch.equal(flat_k[slots[keep]], k[keep].to(dtype)) and torch.equal(flat_v[slots[keep]], v[keep].to(dtype))
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_store_kv_cache_and_copy_blocks(backend):
    nb, bs, kvh, d = 7, 4, 3, 5
    k_cache = torch.full((nb, bs, kvh, d), float("nan"))
    v_cache = torch.full((nb, bs, kvh, d), float("nan"))
    k, v = torch.randn(6, kvh, d), torch.randn(6, kvh, d)
    slots = torch.tensor([0, 5, 27, -1, 13, 14])
    with use_backend(backend):
        ops.store_kv_cache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert flat_k[untouched].isnan().all()
    kv = torch.randn(2, 2, nb, bs, kvh, d)
    expect = kv.clone()
    expect[:, :, [4, 6]] = kv[:, :, [1, 2]]
    with use_backend(backend):
        ops.copy_blocks(kv, torch.tensor([1, 2]), torch.tensor([4, 6]))
    assert torch.equal(kv, expect)
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.store_kv_cache(k, v, k_cache, v_cache, slots[:3])


# --- sliding window, soft-capping, sinks ---

def stale_before_window(tables, lens, bs, window):
    """The tables with every entry before each row's window set to -1 (as the engine leaves freed blocks): a kernel
    that reads one fails (native: an error; Triton, torch: a wrong block, NaN or out of range)."""
    tables = tables.clone()
    for b, n in enumerate(lens.tolist()):
        tables[b, : max(0, n - window) // bs] = -1
    return tables


OPTIONS = [  # (window, softcap, sinks)
    (5, 0.0, False), (16, 0.0, False), (17, 0.0, False), (1, 0.0, False), (1000, 0.0, False),
    (0, 3.0, False), (0, 0.0, True), (7, 2.5, True),
]


@pytest.mark.parametrize("kernel", ["native", "triton", "torch"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])  # GQA ratios 1, 3
@pytest.mark.parametrize("window,softcap,use_sinks", OPTIONS)
def test_options_match_dense_fp64_fp32(kernel, heads, kv_heads, window, softcap, use_sinks):
    """Windows smaller than a block, equal to it, one past it, of a single key and larger than every context; odd
    head_dim and block size; tables stale before the window."""
    lens = [1, 7, 8, 9, 23, 41] if kernel == "triton" else [1, 7, 8, 9, 23, 41, 100, 257]
    q, k, v, tables, lens_t = case(heads, kv_heads, torch.float32, lens=lens, d=20, bs=8, seed=window + heads)
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(5)) * 2 if use_sinks else None
    scale = 0.4  # large enough that soft-capping bites
    if window:
        tables = stale_before_window(tables, lens_t, 8, window)
    out = _run(kernel, q, k, v, tables, lens_t, scale, window, softcap, sinks)
    ref = dense_fp64(q, k, v, tables, lens_t, scale, window, softcap, sinks)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    f64 = [x.double() for x in (q, k, v)]
    torch.testing.assert_close(reference.paged_attention(*f64, tables, lens_t, scale, window, softcap, sinks),
                               ref, **tol(torch.float64))


@pytest.mark.parametrize("kernel", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_options_other_dtypes(kernel, dtype):
    q, k, v, tables, lens = case(6, 2, dtype, lens=[1, 5, 40, 97], d=20, bs=8, seed=3)
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(1))
    tables = stale_before_window(tables, lens, 8, 12)
    out = _run(kernel, q, k, v, tables, lens, 0.3, 12, 4.0, sinks)
    assert out.dtype == dtype
    ref = dense_fp64(q, k, v, tables, lens, 0.3, 12, 4.0, sinks)
    torch_err = (reference.paged_attention(q, k, v, tables, lens, 0.3, 12, 4.0, sinks).double() - ref).abs().max()
    err = (out.double() - ref).abs().max()
    assert err <= 2 * torch_err + tol(dtype)["atol"], (err, torch_err)


@needs_native
@pytest.mark.parametrize("d,bs,heads,kv_heads", [(32, 16, 8, 2), (64, 5, 4, 2)])
@pytest.mark.parametrize("window,softcap,use_sinks", [(9, 0.0, False), (21, 5.0, True)])
def test_native_fp32_wide_heads_options(d, bs, heads, kv_heads, window, softcap, use_sinks):
    """The AVX2 path (head_dim % 32 == 0) with a window (every context length around it), capping and sinks."""
    lens = list(range(1, 80, 3)) + [window, window + 1, bs * 3 + 1]
    q, k, v, tables, lens_t = case(heads, kv_heads, torch.float32, lens=lens, d=d, bs=bs, seed=d + bs)
    sinks = torch.randn(heads) if use_sinks else None
    tables = stale_before_window(tables, lens_t, bs, window)
    out = poisoned_native(q, k, v, tables, lens_t, d ** -0.5 * 3, window, softcap, sinks)
    ref = dense_fp64(q, k, v, tables, lens_t, d ** -0.5 * 3, window, softcap, sinks)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))


@pytest.mark.parametrize("kernel", ["native", "triton", "torch"])
def test_wide_window_is_bitwise_no_window(kernel):
    """A window at least as long as every context, and softcap 0 / no sinks, compute exactly the plain attention."""
    q, k, v, tables, lens = case(8, 2, torch.float32, lens=[1, 16, 17, 40])
    plain = _run(kernel, q, k, v, tables, lens, 0.2)
    assert torch.equal(_run(kernel, q, k, v, tables, lens, 0.2, 40, 0.0, None), plain)
    assert torch.equal(_run(kernel, q, k, v, tables, lens, 0.2, 1 << 30, 0.0, None), plain)


@pytest.mark.parametrize("kernel", ["native", "triton", "torch"])
def test_window_rows_are_batch_invariant(kernel):
    q, k, v, tables, lens = case(8, 2, torch.float32, lens=[3, 30, 17, 41])
    sinks = torch.randn(8)
    full = _run(kernel, q, k, v, tables, lens, 0.2, 10, 2.0, sinks)
    for i in (0, 3):
        alone = _run(kernel, q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1], 0.2, 10, 2.0, sinks)
        assert torch.equal(alone[0], full[i])


def test_public_op_options_and_errors():
    q, k, v, tables, lens = case(4, 2, torch.float32, lens=[3, 20])
    sinks = torch.randn(4, dtype=torch.bfloat16)  # a model's parameter dtype; the op reads it in fp32
    tables = stale_before_window(tables, lens, BS, 6)
    ref = dense_fp64(q, k, v, tables, lens, 0.5, 6, 1.5, sinks.float())
    for backend in ["torch", "triton"] + (["native"] if _native.has("paged_attention_cpu") else []):
        with use_backend(backend):
            out = ops.paged_attention(q, k, v, tables, lens, scale=0.5, sliding_window=6, softcap=1.5, sinks=sinks)
            torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    with pytest.raises(ValueError, match="sinks must be"):
        ops.paged_attention(q, k, v, tables, lens, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="sliding_window"):
        ops.paged_attention(q, k, v, tables, lens, sliding_window=-1)
    with pytest.raises(ValueError, match="softcap"):
        ops.paged_attention(q, k, v, tables, lens, softcap=-1.0)
