"""GPU: paged decode attention (Triton and CUDA C++), store_kv_cache and copy_blocks (Triton) against float64 dense
attention, at the CPU tests' shapes and at the headline one (batch 32, context 2k, GQA 32/8, head_dim 128, block 16),
outputs poisoned with NaN first, and row results independent of the batch (torch.equal); with a sliding window (tables
stale before it), soft-capping and sinks."""
import pytest
import torch
from _gpu import DEVICE, cuda_only, dry_subset, first_in_dry_run, native_cuda
from test_paged_attention import case, dense_fp64, stale_before_window

from rlhf_fast import _native, ops
from rlhf_fast.ops import reference, use_backend

pytestmark = pytest.mark.gpu
KERNELS = ["triton", pytest.param("native", marks=native_cuda("paged_attention_cuda"))]
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _case(lens, heads, kv_heads, d, bs, dtype):
    """The CPU tests' random queries and paged caches (`test_paged_attention.case`), moved to the device."""
    return [t.to(DEVICE) for t in case(heads, kv_heads, dtype, lens=lens, d=d, bs=bs)]


def _kernel(kernel, q, k, v, tables, lens, scale, window=0, softcap=0.0, sinks=None):
    """The kernel itself, writing into a NaN-poisoned output (an unwritten element fails)."""
    out = torch.full_like(q, float("nan"))
    sinks = None if sinks is None else sinks.float().contiguous()
    if kernel == "triton":
        from rlhf_fast.kernels.paged_attention import paged_attention_fwd

        return paged_attention_fwd(q, k, v, tables, lens, scale, window, softcap, sinks, out=out)
    _native.fn("paged_attention_cuda")(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(),
                                       lens.data_ptr(), q.shape[0], q.shape[1], k.shape[2], q.shape[2], k.shape[1],
                                       tables.shape[1], k.shape[0], scale, _native.dtype_code(q), window, softcap,
                                       0 if sinks is None else sinks.data_ptr(), _native.stream_handle(q))
    return out


CASES = first_in_dry_run(
    dict(lens=[1, 16, 17, 40], heads=4, kv_heads=2, d=24, bs=4),  # the CPU tests' block edges, GQA 2
    dict(lens=[1, 16, 17, 100, 257, 33], heads=8, kv_heads=2, d=64, bs=16),
    dict(lens=[5, 300, 64], heads=6, kv_heads=6, d=32, bs=16),  # MHA
    pytest.param(dict(lens=[2048] * 32, heads=32, kv_heads=8, d=128, bs=16), marks=cuda_only),  # the headline
    pytest.param(dict(lens=[4096, 1, 2047, 17] * 4, heads=32, kv_heads=8, d=128, bs=16), marks=cuda_only),
)


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_attention_matches_fp64(kernel, shape, dtype):
    q, k, v, tables, lens = _case(**shape, dtype=dtype)
    scale = shape["d"] ** -0.5
    out = _kernel(kernel, q, k, v, tables, lens, scale)
    ref = reference.paged_attention(q.double(), k.double(), v.double(), tables, lens, scale)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("opts", first_in_dry_run((7, 0.0, False), (16, 0.0, False), (0, 3.0, True), (33, 2.0, True)))
@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_attention_options_match_fp64(kernel, opts, dtype):
    """Sliding window (entries before it set to -1: never read), soft-capping, sinks (window, softcap, sinks)."""
    window, softcap, use_sinks = opts
    q, k, v, tables, lens = _case(lens=[1, 16, 17, 100, 257, 33], heads=8, kv_heads=2, d=64, bs=16, dtype=dtype)
    tables = stale_before_window(tables, lens, 16, window) if window else tables
    sinks = torch.randn(8, device=DEVICE) if use_sinks else None
    out = _kernel(kernel, q, k, v, tables, lens, 0.4, window, softcap, sinks)
    ref = dense_fp64(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens.cpu(), 0.4, window, softcap,
                     None if sinks is None else sinks.cpu())
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double().cpu(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("backend", ["triton", pytest.param("native", marks=native_cuda("paged_attention_cuda"))])
def test_paged_attention_row_independent_of_batch(backend):
    dims = (8, 2, 64, 16) if DEVICE.type == "cuda" else (4, 2, 16, 4)
    q, k, v, tables, lens = _case([1, 16, 17, 100, 33] if DEVICE.type == "cuda" else [1, 5, 4, 9, 2], *dims,
                                  torch.bfloat16)
    with use_backend(backend):
        full = ops.paged_attention(q, k, v, tables, lens)
        for rows in dry_subset((slice(2, 3), slice(0, 2), slice(1, 5))):
            part = ops.paged_attention(q[rows].clone(), k, v, tables[rows].clone(), lens[rows].clone())
            assert torch.equal(part, full[rows]), rows
        perm = torch.tensor([4, 0, 3, 1, 2], device=DEVICE)
        assert torch.equal(ops.paged_attention(q[perm], k, v, tables[perm], lens[perm]), full[perm])


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.bfloat16, torch.float32))
@pytest.mark.parametrize("dims", first_in_dry_run((7, 4, 3, 5), pytest.param((512, 16, 8, 128), marks=cuda_only)))
def test_store_kv_cache_and_copy_blocks(dims, dtype):
    nb, bs, kvh, d = dims
    k_cache = torch.full((nb, bs, kvh, d), float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    n = min(6, nb * bs) if nb < 100 else 1000
    slots = torch.randperm(nb * bs, device=DEVICE)[:n]
    slots[n // 2] = -1  # skipped
    k = torch.randn(n, kvh, d, device=DEVICE).to(dtype)
    v = torch.randn(n, kvh, d, device=DEVICE).to(dtype)
    with use_backend("triton"):
        ops.store_kv_cache(k, v, k_cache, v_cache, slots)
    expect_k = torch.full_like(k_cache, float("nan"))
    expect_v = torch.full_like(v_cache, float("nan"))
    reference.store_kv_cache(k, v, expect_k, expect_v, slots)
    assert torch.equal(k_cache.nan_to_num(7.0), expect_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), expect_v.nan_to_num(7.0))
    kv = torch.randn(2, 2, nb, bs, kvh, d, device=DEVICE).to(dtype)
    src = torch.tensor([1, 2], device=DEVICE)
    dst = torch.tensor([4, nb - 1], device=DEVICE)
    expect = kv.clone()
    reference.copy_blocks(expect, src, dst)
    with use_backend("triton"):
        ops.copy_blocks(kv, src, dst)
    assert torch.equal(kv, expect)
