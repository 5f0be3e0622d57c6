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


def dense_fp64(q, k, v, tables, lens, scale):
    """Dense attention written independently of the kernels: gather each row's keys, repeat kv heads, softmax."""
    out = []
    h, kvh = q.shape[1], k.shape[2]
    for b, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        blocks = tables[b, t // k.shape[1]].long()
        kk = k[blocks, t % k.shape[1]].double().repeat_interleave(h // kvh, dim=1)  # (n, H, D)
        vv = v[blocks, t % k.shape[1]].double().repeat_interleave(h // kvh, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), kk) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, vv))
    return torch.stack(out)


def poisoned_native(q, k, v, tables, lens, scale):
    out = torch.full_like(q, float("nan"))
    _native.fn("paged_attention_cpu")(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(),
                                      lens.data_ptr(), q.shape[0], q.shape[1], k.shape[2], q.shape[2], k.shape[1],
                                      tables.shape[1], k.shape[0], scale, _native.dtype_code(q))
    return out


def poisoned_triton(q, k, v, tables, lens, scale):
    from rlhf_fast.kernels.paged_attention import paged_attention_fwd

    return paged_attention_fwd(q, k, v, tables, lens, scale, out=torch.full_like(q, float("nan")))


KERNELS = {"native": poisoned_native, "triton": poisoned_triton}
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
