"""token_logprobs: every backend against the float64 reference, gradients, batch invariance and bad input; with
and without the final logit soft-cap (softcap: 30 barely bends logits of this scale, 2 saturates most of them)."""
import pytest
import torch
from conftest import tol

from _backends import DEVICE, HAS_TRITON, LOGPROB_BACKENDS, needs_triton

from rlhf_fast import _native
from rlhf_fast.ops import reference, token_logprobs, use_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SOFTCAPS = (0.0, 30.0, 2.0)
BACKENDS = LOGPROB_BACKENDS
TRITON = needs_triton("token_logprobs")


def _inputs(shape, vocab, dtype, *, scale=3.0, ignore_frac=0.2, device="cpu"):
    logits = (torch.randn(*shape, vocab, device=device) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return logits, labels


def _check_against_fp64(logits, labels, temperature, *, check_grad=True, softcap=0.0):
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = token_logprobs(x, labels, temperature=temperature, return_entropy=True, softcap=softcap)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == labels.shape
    x64 = logits.detach().double().requires_grad_(True)
    ref_logp, ref_ent = reference.token_logprobs(x64, labels, temperature=temperature, return_entropy=True,
                                                 softcap=softcap)
    # flash-attention's rule: at most ~2x the error of PyTorch in the same dtype (plus the dtype's tolerance).
    t = tol(logits.dtype)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **t)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), **t)
    if not check_grad:
        return
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    (dx,) = torch.autograd.grad((logp * g1.float()).sum() + (ent * g2.float()).sum(), x)
    (dref,) = torch.autograd.grad((ref_logp * g1).sum() + (ref_ent * g2).sum(), x64)
    assert dx.dtype == logits.dtype
    torch.testing.assert_close(dx.double(), dref, atol=t["atol"] * 4, rtol=t["rtol"] * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", [((5,), 1), ((3, 4), 7), ((13,), 4231), ((2, 3), 32011)])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_matches_fp64(backend, dtype, shape, vocab, softcap):
    logits, labels = _inputs(shape, vocab, dtype)
    with use_backend(backend):
        _check_against_fp64(logits, labels, temperature=0.7 if vocab % 2 else 1.0, softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_float64_input_and_entropy_only_grad(backend, softcap):
    logits, labels = _inputs((6,), 301, torch.float64)
    x = logits.clone().requires_grad_(True)
    kw = dict(temperature=1.3, return_entropy=True, softcap=softcap)
    with use_backend(backend):
        logp, ent = token_logprobs(x, labels, **kw)
    ref_logp, ref_ent = reference.token_logprobs(logits, labels, **kw)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref_logp, **tol(torch.float64))
    (dx,) = torch.autograd.grad(ent.sum(), x)  # entropy gradient alone (no dlogp)
    x64 = logits.clone().requires_grad_(True)
    (dref,) = torch.autograd.grad(reference.token_logprobs(x64, labels, **kw)[1].sum(), x64)
    torch.testing.assert_close(dx, dref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_softcap_is_the_capped_logits_softmax(backend, temperature):
    """softcap=c equals the op on transformers' capped logits (c * tanh(x / c), then / temperature): the kernels cap
    before the temperature, and the gradient reaches x through the cap (zero where it saturates)."""
    x = torch.randn(7, 97, dtype=torch.float64) * 6
    x[0, :3] = torch.tensor([1e4, -1e4, 60.0])  # saturated: tanh = +-1 in every dtype
    labels = torch.randint(0, 97, (7,))
    labels[2] = -100
    leaves = [x.clone().requires_grad_(True) for _ in range(2)]
    with use_backend(backend):
        capped = token_logprobs(leaves[0], labels, temperature=temperature, softcap=3.0, return_entropy=True)
        composed = token_logprobs(torch.tanh(leaves[1] / 3.0) * 3.0, labels, temperature=temperature,
                                  return_entropy=True)
    for a, b in zip(capped, composed):
        torch.testing.assert_close(a, b, **tol(torch.float64))
    grads = [torch.autograd.grad(sum(o.sum() for o in out), leaf)[0] for out, leaf in ((capped, leaves[0]),
                                                                                      (composed, leaves[1]))]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-9)
    assert grads[0][0, :2].abs().max() < 1e-12
    lp30 = token_logprobs(x, labels, softcap=30.0)  # the cap is a real change of the distribution
    assert (lp30 - token_logprobs(x, labels)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_empty_and_all_ignored(backend):
    with use_backend(backend):
        for shape in [(0,), (2, 0), (4,)]:
            x = torch.randn(*shape, 11, requires_grad=True)
            labels = torch.full(shape, -100, dtype=torch.long)
            logp, ent = token_logprobs(x, labels, return_entropy=True)
            assert logp.shape == shape and torch.equal(logp, torch.zeros(shape))
            assert torch.equal(ent, torch.zeros(shape))
            (dx,) = torch.autograd.grad((logp + ent).sum(), x)
            assert torch.equal(dx, torch.zeros_like(x))
        x = torch.randn(3, 9, requires_grad=True)
        labels = torch.tensor([1, -1, 5])  # custom ignore_index
        logp = token_logprobs(x, labels, ignore_index=-1)
        assert logp[1] == 0 and logp[0] < 0
        (dx,) = torch.autograd.grad(logp.sum(), x)
        assert torch.equal(dx[1], torch.zeros(9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_extreme_logits(backend, dtype, softcap):
    """-inf logits (banned tokens), huge and subnormal values stay finite where the answer is finite. Soft-capped,
    a -inf logit becomes -softcap (as in transformers, whose cap comes before any masking) with gradient 0."""
    x = torch.randn(4, 50) * 5
    x[:, :10] = float("-inf")
    x[1, 20] = 1e4
    x[2, 11:14] = torch.tensor([1e-7, -3e-8, 0.0])  # subnormal in fp16
    x = x.to(dtype)
    labels = torch.tensor([12, 20, 30, 49])
    with use_backend(backend):
        logp, ent = token_logprobs(x.clone().requires_grad_(True), labels, return_entropy=True, softcap=softcap)
    ref_logp, ref_ent = reference.token_logprobs(x.double(), labels, return_entropy=True, softcap=softcap)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-4, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    with use_backend(backend):
        logp, ent = token_logprobs(xg, labels, return_entropy=True, softcap=softcap)
    (dx,) = torch.autograd.grad((logp + ent).sum(), xg)
    assert torch.isfinite(dx).all() and torch.equal(dx[:, :10], torch.zeros(4, 10))


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_batch_invariance(backend, softcap):
    if backend == "native" and not _native.has("token_logprobs_fwd_cpu"):
        pytest.skip("native logprobs not built")
    # bitwise for native; the torch reference's vectorised exp may round a tail element differently
    same = torch.equal if backend == "native" else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6))
    logits, labels = _inputs((64,), 3001, torch.bfloat16, ignore_frac=0.0)
    kw = dict(return_entropy=True, softcap=softcap)
    with use_backend(backend):
        full_lp, full_ent = token_logprobs(logits, labels, **kw)
        for rows in [slice(0, 1), slice(5, 6), slice(17, 40), slice(63, 64)]:
            lp, ent = token_logprobs(logits[rows].clone(), labels[rows].clone(), **kw)
            assert same(lp, full_lp[rows]) and same(ent, full_ent[rows])
        perm = torch.randperm(64)
        lp, ent = token_logprobs(logits[perm], labels[perm], **kw)
        assert same(lp, full_lp[perm]) and same(ent, full_ent[perm])


def _row_kernels(kind):
    if kind == "native":
        if not _native.has("token_logprobs_bwd_cpu"):
            pytest.skip("native logprobs not built")
        from rlhf_fast.ops._linear_chunked import native_rows_bwd, native_rows_fwd

        return native_rows_fwd, native_rows_bwd
    if not HAS_TRITON:
        pytest.skip("needs Triton on CUDA or TRITON_INTERPRET=1")
    from rlhf_fast.kernels.logprobs import logprobs_bwd, logprobs_fwd

    return logprobs_fwd, logprobs_bwd


@pytest.mark.parametrize("kind", ["native", "triton"])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_kernels_write_every_output(kind, softcap):
    """Outputs poisoned with NaN before the kernel writes them; the in-place backward overwrites the logits."""
    native_rows_fwd, native_rows_bwd = _row_kernels(kind)
    logits, labels = _inputs((37,), 517 if kind == "native" else 77, torch.float32)
    logits[3, :5] = float("-inf")  # banned tokens
    logp, lse, ent = (torch.full((37,), float("nan")) for _ in range(3))
    native_rows_fwd(logits, labels, 0.5, -100, logp, lse, ent, None, softcap)
    kw = dict(temperature=2.0, softcap=softcap)
    ref_logp, ref_ent = reference.token_logprobs(logits.double(), labels, return_entropy=True, **kw)
    torch.testing.assert_close(logp.double(), ref_logp, **tol(torch.float32))
    torch.testing.assert_close(ent.double(), ref_ent, **tol(torch.float32))
    g = torch.randn(37)
    out = torch.full_like(logits, float("nan"))
    ref_x = logits.double().requires_grad_(True)
    ref_lp = reference.token_logprobs(ref_x, labels, **kw)
    (ref_dx,) = torch.autograd.grad((ref_lp * g.double()).sum(), ref_x)
    native_rows_bwd(logits, labels, lse, ent, g, torch.zeros(37), 0.5, -100, out, None, softcap)
    buf = logits.clone()
    native_rows_bwd(buf, labels, lse, ent, g, torch.zeros(37), 0.5, -100, buf, None, softcap)
    assert torch.isfinite(out).all() and torch.equal(out, buf)
    torch.testing.assert_close(out.double(), ref_dx, **tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with use_backend(backend):
        with pytest.raises(ValueError, match="labels must be in"):
            token_logprobs(x, torch.tensor([0, 10, 1, 2]))
        with pytest.raises(ValueError, match="labels must be in"):
            token_logprobs(x, torch.tensor([0, -5, 1, 2]))
        with pytest.raises(ValueError, match="labels must have shape"):
            token_logprobs(x, y[:3])
        with pytest.raises(TypeError, match="logits must have dtype"):
            token_logprobs(x.long(), y)
        with pytest.raises(TypeError, match="labels must have dtype"):
            token_logprobs(x, y.float())
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(x, y, temperature=0.0)
        with pytest.raises(ValueError, match="vocabulary"):
            token_logprobs(torch.randn(4, 0), y)
        with pytest.raises(ValueError, match="at least 1 dims"):
            token_logprobs(torch.tensor(1.0), y)
        with pytest.raises(ValueError, match="labels is on cpu but logits is on meta"):
            token_logprobs(x.to("meta"), y)
        for bad in (-1.0, float("inf"), float("nan"), True, "30"):
            with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
                token_logprobs(x, y, softcap=bad)


@TRITON
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", [((3,), 1), ((2, 3), 7), ((5,), 300)])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_triton_matches_fp64(dtype, shape, vocab, softcap):
    logits, labels = _inputs(shape, vocab, dtype, device=DEVICE)
    with use_backend("triton"):
        _check_against_fp64(logits, labels, temperature=0.8, softcap=softcap)


@TRITON
def test_triton_batch_invariance_and_ignored():
    logits, labels = _inputs((9,), 257, torch.float32, device=DEVICE)
    labels[2] = -100
    with use_backend("triton"):
        full_lp, full_ent = token_logprobs(logits, labels, return_entropy=True)
        lp, ent = token_logprobs(logits[3:5].clone(), labels[3:5].clone(), return_entropy=True)
        empty = token_logprobs(logits[:0], labels[:0])
    assert torch.equal(lp, full_lp[3:5]) and torch.equal(ent, full_ent[3:5])
    assert full_lp[2] == 0 and full_ent[2] == 0 and empty.shape == (0,)


@pytest.mark.skipif(not _native.has("token_logprobs_fwd_cpu"), reason="native logprobs not built")
def test_custom_ops_pass_opcheck():
    """Schema, fake-tensor and autograd registration of the native custom ops (torch.compile relies on them)."""
    x = torch.randn(5, 17, requires_grad=True)
    y = torch.tensor([3, -100, 0, 16, 9])
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs_fwd.default, (x, y, 0.7, -100))
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs_fwd.default, (x, y, 0.7, -100, None, 2.0))
    lse, ent, g = torch.randn(5), torch.rand(5), torch.randn(5)
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs_bwd.default, (x.detach(), y, lse, ent, g, g, 0.7, -100))
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs_bwd.default,
                          (x.detach(), y, lse, ent, g, g, 0.7, -100, None, 2.0))
