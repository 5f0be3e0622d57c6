"""GPU: the Triton log-prob kernels (token_logprobs, linear_token_logprobs) against float64 at the CPU tests' shapes
and at real ones (vocab 151936, bf16, hidden 4096), and bitwise batch invariance (torch.equal); the final logit
soft-cap (Gemma 2's 30, and a bending 2) on the row, selection and fused linear kernels."""
import pytest
import torch
from _gpu import DEVICE, assert_within_twice_torch, cuda_only, first_in_dry_run, not_in_dry_run
from conftest import tol

from rlhf_fast.ops import linear_token_logprobs, reference, token_logprobs, use_backend

pytestmark = pytest.mark.gpu
REAL_VOCAB, REAL_WIDTH = 151936, 4096


def _logits(lead, vocab, dtype, *, ignore_frac=0.2):
    logits = (torch.randn(*lead, vocab, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    labels[torch.rand(lead, device=DEVICE) < ignore_frac] = -100
    return logits, labels


def _token_fwd_bwd(logits, labels, temperature, backend, **kw):
    x = logits.detach().clone().requires_grad_(True)
    with use_backend(backend):
        logp, ent = token_logprobs(x, labels, temperature=temperature, return_entropy=True, **kw)
    g = torch.linspace(-1, 1, logp.numel(), device=logp.device).view_as(logp)
    (dx,) = torch.autograd.grad((logp * g).sum() + (ent * g.flip(-1)).sum(), x)
    return logp, ent, dx


def _token_ref(logits, labels, temperature, **kw):
    x = logits.detach().double().requires_grad_(True)
    logp, ent = reference.token_logprobs(x, labels, temperature=temperature, return_entropy=True, **kw)
    g = torch.linspace(-1, 1, logp.numel(), device=logp.device, dtype=torch.float64).view_as(logp)
    (dx,) = torch.autograd.grad((logp * g).sum() + (ent * g.flip(-1)).sum(), x)
    return logp.detach(), ent.detach(), dx


TOKEN_CASES = [
    pytest.param((2, 3), 7, id="tiny-v7"), pytest.param((3,), 1, marks=not_in_dry_run, id="tiny-v1"),
    pytest.param((5,), 300, marks=not_in_dry_run, id="tiny-v300"),
    pytest.param((13,), 4231, marks=cuda_only, id="v4231"), pytest.param((2, 3), 32011, marks=cuda_only, id="v32011"),
]


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.bfloat16, torch.float32, torch.float16))
@pytest.mark.parametrize("lead,vocab", TOKEN_CASES)
def test_token_logprobs_matches_fp64(lead, vocab, dtype):
    logits, labels = _logits(lead, vocab, dtype)
    logp, ent, dx = _token_fwd_bwd(logits, labels, 0.8, "triton")
    ref_logp, ref_ent, ref_dx = _token_ref(logits, labels, 0.8)
    t = tol(dtype)
    assert logp.dtype == torch.float32 and dx.dtype == dtype and logp.shape == labels.shape
    torch.testing.assert_close(logp.double(), ref_logp, **t)
    torch.testing.assert_close(ent.double(), ref_ent, **t)
    torch.testing.assert_close(dx.double(), ref_dx, atol=4 * t["atol"], rtol=4 * t["rtol"])


@cuda_only
def test_token_logprobs_real_vocab_bf16_within_twice_torch():
    logits, labels = _logits((96,), REAL_VOCAB, torch.bfloat16)
    ref = _token_ref(logits, labels, 1.0)
    kernel = _token_fwd_bwd(logits, labels, 1.0, "triton")
    plain = _token_fwd_bwd(logits, labels, 1.0, "torch")
    for name, k, p, r in zip(("logp", "entropy", "dlogits"), kernel, plain, ref):
        assert_within_twice_torch(k, p, r, slack=1e-3, what=name)


@pytest.mark.parametrize("vocab,dtype", [pytest.param(257, torch.float32, id="tiny"),
                                         pytest.param(REAL_VOCAB, torch.bfloat16, marks=cuda_only, id="real")])
def test_token_logprobs_batch_invariant(vocab, dtype):
    n = 8 if vocab < 1000 else 64
    logits, labels = _logits((n,), vocab, dtype, ignore_frac=0.1)
    with use_backend("triton"), torch.no_grad():
        full_lp, full_ent = token_logprobs(logits, labels, return_entropy=True)
        for rows in (slice(0, 1), slice(5, 6), slice(2, n - 2), slice(n - 1, n)):
            lp, ent = token_logprobs(logits[rows].clone(), labels[rows].clone(), return_entropy=True)
            assert torch.equal(lp, full_lp[rows]) and torch.equal(ent, full_ent[rows]), rows
        perm = torch.randperm(n, device=DEVICE)
        lp, ent = token_logprobs(logits[perm], labels[perm], return_entropy=True)
        assert torch.equal(lp, full_lp[perm]) and torch.equal(ent, full_ent[perm])
        lp2 = token_logprobs(logits.view(4, n // 4, vocab), labels.view(4, n // 4))  # batch x time layout
        assert torch.equal(lp2.view(-1), full_lp)


def _linear(lead, width, vocab, dtype, *, ignore_frac=0.25, bias=True):
    hidden = torch.randn(*lead, width, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, width, device=DEVICE) / width**0.5 * 2).to(dtype)
    b = (torch.randn(vocab, device=DEVICE) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    labels[torch.rand(lead, device=DEVICE) < ignore_frac] = -100
    return hidden, weight, b, labels


def _linear_fwd_bwd(hidden, weight, bias, labels, *, backend=None, ref=False, temperature=0.9, softcap=0.0):
    cast = (lambda t: t.double()) if ref else (lambda t: t)
    leaves = [cast(t.detach()).requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    b = leaves[2] if bias is not None else None
    if ref:
        logp, ent = reference.linear_token_logprobs(leaves[0], leaves[1], labels, bias=b, temperature=temperature,
                                                    return_entropy=True, softcap=softcap)
    else:
        with use_backend(backend):
            logp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=b, temperature=temperature,
                                              return_entropy=True, softcap=softcap)
    g = torch.linspace(-1, 1, logp.numel(), device=logp.device, dtype=logp.dtype).view_as(logp)
    grads = torch.autograd.grad((logp * g).sum() + (ent * g.flip(-1)).sum(), leaves)
    return (logp.detach(), ent.detach(), *grads)


LINEAR_CASES = [
    pytest.param((2, 5), 32, 150, id="tiny-h32-v150"), pytest.param((3,), 16, 7, marks=not_in_dry_run, id="tiny-h16-v7"),
    pytest.param((130,), 24, 4231, marks=cuda_only, id="h24-v4231"),
]


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.bfloat16, torch.float32, torch.float16))
@pytest.mark.parametrize("lead,width,vocab", LINEAR_CASES)
def test_linear_logprobs_matches_fp64(lead, width, vocab, dtype):
    hidden, weight, bias, labels = _linear(lead, width, vocab, dtype)
    out = _linear_fwd_bwd(hidden, weight, bias, labels, backend="triton")
    ref = _linear_fwd_bwd(hidden, weight, bias, labels, ref=True)
    t = tol(dtype)
    scale = 1.0 if dtype == torch.float32 else 4.0  # 16-bit logits are rounded once, as nn.Linear would
    for i, (name, o, r) in enumerate(zip(("logp", "entropy", "dhidden", "dweight", "dbias"), out, ref)):
        s = scale * (4.0 if i >= 2 else 1.0)
        torch.testing.assert_close(o.double(), r, atol=t["atol"] * s, rtol=t["rtol"] * s, msg=lambda m: f"{name}: {m}")


@cuda_only
def test_linear_logprobs_real_size_bf16_within_twice_torch():
    """hidden 4096, vocab 151936, bf16, 192 tokens: fwd and every gradient within 2x the torch path's error."""
    hidden, weight, bias, labels = _linear((192,), REAL_WIDTH, REAL_VOCAB, torch.bfloat16, bias=False)
    ref = _linear_fwd_bwd(hidden, weight, None, labels, ref=True)
    kernel = _linear_fwd_bwd(hidden, weight, None, labels, backend="triton")
    plain = _linear_fwd_bwd(hidden, weight, None, labels, backend="torch")
    for name, k, p, r in zip(("logp", "entropy", "dhidden", "dweight"), kernel, plain, ref):
        assert_within_twice_torch(k, p, r, slack=2e-3, what=name)


@pytest.mark.parametrize("width,vocab,dtype", [pytest.param(16, 70, torch.float32, id="tiny"),
                                               pytest.param(REAL_WIDTH, REAL_VOCAB, torch.bfloat16,
                                                            marks=cuda_only, id="real")])
def test_linear_logprobs_batch_invariant(width, vocab, dtype):
    n = 10 if vocab < 1000 else 80
    hidden, weight, bias, labels = _linear((n,), width, vocab, dtype, ignore_frac=0.0, bias=vocab < 1000)
    with use_backend("triton"), torch.no_grad():
        base_lp, base_ent = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
        for rows, chunk in ((slice(5, 9), 2), (slice(0, 1), None), (slice(1, n), 7)):
            lp, ent = linear_token_logprobs(hidden[rows].clone(), weight, labels[rows].clone(), bias=bias,
                                            return_entropy=True, chunk_size=chunk)
            assert torch.equal(lp, base_lp[rows]) and torch.equal(ent, base_ent[rows]), (rows, chunk)
        perm = torch.randperm(n, device=DEVICE)
        lp = linear_token_logprobs(hidden[perm], weight, labels[perm], bias=bias)
        assert torch.equal(lp, base_lp[perm])


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("lead,vocab,top_k,top_p", [
    pytest.param((5,), 37, 6, 0.8, id="tiny-v37"),
    pytest.param((41,), 4231, 50, 0.9, marks=cuda_only, id="v4231"),
    pytest.param((96,), REAL_VOCAB, 50, 0.9, marks=cuda_only, id="v151936"),
])
def test_support_threshold_and_truncated_logprobs_match_fp64(lead, vocab, top_k, top_p, dtype):
    """The top-k / top-p selection kernel (support_threshold) and the thresholded Triton row kernels against the
    float64 sort-and-cumsum reference: thresholds exactly, log-prob / entropy / gradient within the dtype's tolerance."""
    from rlhf_fast.ops import support_threshold

    logits, labels = _logits(lead, vocab, dtype)
    with use_backend("triton"):
        thr = support_threshold(logits, temperature=0.8, top_k=top_k, top_p=top_p)
    ref_thr = reference.support_threshold(logits.double(), temperature=0.8, top_k=top_k, top_p=top_p)
    kept = logits.float() * (1 / 0.8) >= thr[..., None]  # thresholds are values of the row: compare the kept sets
    assert torch.equal(kept, logits.double() * (1 / 0.8) >= ref_thr[..., None])
    x = logits.detach().clone().requires_grad_(True)
    with use_backend("triton"):
        logp, ent = token_logprobs(x, labels, temperature=0.8, top_k=top_k, top_p=top_p, return_entropy=True)
    (dx,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    xr = logits.detach().double().requires_grad_(True)
    rlogp, rent = reference.token_logprobs(xr, labels, temperature=0.8, top_k=top_k, top_p=top_p,
                                           return_entropy=True)
    (rdx,) = torch.autograd.grad(rlogp.sum() + rent.sum(), xr)
    t = tol(dtype)
    torch.testing.assert_close(logp.double(), rlogp.detach(), **t)
    torch.testing.assert_close(ent.double(), rent.detach(), **t)
    torch.testing.assert_close(dx.double(), rdx, atol=4 * t["atol"], rtol=4 * t["rtol"])


@pytest.mark.parametrize("softcap", first_in_dry_run(2.0, 30.0))
@pytest.mark.parametrize("lead,width,vocab,dtype", [
    pytest.param((2, 5), 32, 150, torch.float32, id="tiny"),
    pytest.param((96,), REAL_WIDTH, REAL_VOCAB, torch.bfloat16, marks=cuda_only, id="real"),
])
def test_softcap_within_twice_torch(lead, width, vocab, dtype, softcap):
    """The soft-capped log-prob kernels (token_logprobs with and without top-k / top-p, the fused linear kernel):
    log-prob, entropy and every gradient within 2x the torch path's error against float64."""
    logits, labels = _logits(lead, vocab, dtype)
    for cut in (dict(), dict(top_k=50, top_p=0.9)):
        kw = dict(softcap=softcap, **cut)
        ref = _token_ref(logits, labels, 0.8, **kw)
        kernel = _token_fwd_bwd(logits, labels, 0.8, "triton", **kw)
        plain = _token_fwd_bwd(logits, labels, 0.8, "torch", **kw)
        for name, k, p, r in zip(("logp", "entropy", "dlogits"), kernel, plain, ref):
            assert_within_twice_torch(k, p, r, slack=1e-3, what=f"{name} {cut}")
    hidden, weight, bias, labels = _linear(lead, width, vocab, dtype, bias=False)
    ref = _linear_fwd_bwd(hidden, weight, None, labels, ref=True, softcap=softcap)
    kernel = _linear_fwd_bwd(hidden, weight, None, labels, backend="triton", softcap=softcap)
    plain = _linear_fwd_bwd(hidden, weight, None, labels, backend="torch", softcap=softcap)
    for name, k, p, r in zip(("logp", "entropy", "dhidden", "dweight"), kernel, plain, ref):
        assert_within_twice_torch(k, p, r, slack=2e-3, what=f"linear {name}")
