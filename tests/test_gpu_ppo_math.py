"""GPU: the Triton PPO-math kernels (kl_penalty, ppo_policy_loss, value_loss, masked_whiten, GAE with fused
whitening) and the CUDA C++ GAE scan against float64, at the CPU tests' shapes and at real ones (2M-8M tokens)."""
import pytest
import torch
from _gpu import DEVICE, cuda_only, dry_subset, first_in_dry_run, native_cuda
from conftest import tol

from rlhf_fast.ops import (PPOClip, gae, gae_packed, kl_penalty, masked_whiten, ppo_policy_loss, reference,
                           use_backend, value_loss)

pytestmark = pytest.mark.gpu
AGGS = dry_subset(("seq-mean-token-mean", "token-mean", "token-sum", "seq-mean-token-sum"))
SHAPES = first_in_dry_run((5, 41), (3, 1), (2, 1100), pytest.param((256, 8192), marks=cuda_only))
DTYPES = first_in_dry_run(torch.float32, torch.bfloat16)


def _mask(b, t, p=0.8):
    m = torch.rand(b, t, device=DEVICE) < p
    m[min(1, b - 1)] = False  # an empty row
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_penalty_matches_fp64(shape, dtype):
    logp = (-3 * torch.rand(shape, device=DEVICE)).to(dtype)
    ref_logp = (logp.float() + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype)
    g = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    for kind in dry_subset(("k3", "k1", "k2", "abs")):
        x, y = logp.clone().requires_grad_(True), ref_logp.clone().requires_grad_(True)
        with use_backend("triton"):
            k = kl_penalty(x, y, kind)
        dx, dy = torch.autograd.grad((k * g.to(k.dtype)).sum(), (x, y))
        x64, y64 = logp.double().requires_grad_(True), ref_logp.double().requires_grad_(True)
        k64 = reference.kl_penalty(x64, y64, kind)
        dx64, dy64 = torch.autograd.grad((k64 * g).sum(), (x64, y64))
        for name, a, b in (("kl", k, k64), ("dlogp", dx, dx64), ("dref", dy, dy64)):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b.detach(), **tol(dtype), msg=lambda m: f"{kind} {name}: {m}")


def _policy_inputs(b, t, dtype):
    logp = (-torch.rand(b, t, device=DEVICE) * 3).to(dtype)
    old = (logp.float() + 0.4 * torch.randn(b, t, device=DEVICE)).to(dtype)
    return logp, old, torch.randn(b, t, device=DEVICE).to(dtype), _mask(b, t)


def _loss_vs_fp64(op, ref_op, inputs, dtype, **kw):
    x = inputs[0].clone().requires_grad_(True)
    with use_backend("triton"):
        loss, stats = op(x, *inputs[1:], **kw)
    (g,) = torch.autograd.grad(loss, x)
    x64 = inputs[0].double().requires_grad_(True)
    ref_loss, ref_stats = ref_op(x64, *(t.double() if t.is_floating_point() else t for t in inputs[1:]), **kw)
    (g64,) = torch.autograd.grad(ref_loss, x64)
    t = tol(torch.float32)  # the math runs in float32 on every backend
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **t, msg=lambda m: f"{kw} loss: {m}")
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g64, **(tol(dtype) if dtype != torch.float32 else t),
                               msg=lambda m: f"{kw} grad: {m}")
    for name in ref_stats:
        torch.testing.assert_close(getattr(stats, name).double(), ref_stats[name].double(), **t,
                                   msg=lambda m: f"{kw} {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_loss_matches_fp64(shape, dtype):
    inputs = _policy_inputs(*shape, dtype)
    for agg in AGGS:
        for clip in dry_subset((PPOClip(0.2, 0.28, 3.0), PPOClip(), PPOClip(0.1))):
            _loss_vs_fp64(ppo_policy_loss, reference.ppo_policy_loss, inputs, dtype, agg=agg, clip=clip)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_value_loss_matches_fp64(shape, dtype):
    b, t = shape
    v = torch.randn(b, t, device=DEVICE).to(dtype)
    old = (v.float() + 0.3 * torch.randn(b, t, device=DEVICE)).to(dtype)
    ret = torch.randn(b, t, device=DEVICE).to(dtype)
    for agg in AGGS:
        for clip in dry_subset((0.2, None)):
            _loss_vs_fp64(value_loss, reference.value_loss, (v, old, ret, _mask(b, t)), dtype, agg=agg, clip=clip)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_whiten_matches_fp64(shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype)
    mask = _mask(*shape)
    for shift in dry_subset((True, False)):
        with use_backend("triton"):
            out = masked_whiten(x, mask, shift_mean=shift)
        ref = reference.masked_whiten(x.double(), mask, shift_mean=shift)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, **tol(dtype))


def _gae_inputs(b, t):
    rewards = torch.randn(b, t, device=DEVICE) * 0.05
    rewards[:, -1] += torch.randn(b, device=DEVICE)
    return rewards, torch.randn(b, t, device=DEVICE), _mask(b, t, p=0.9)


GAE_SHAPES = first_in_dry_run((3, 41), (1, 1), (7, 300), pytest.param((64, 2048), marks=cuda_only),
                              pytest.param((4096, 2048), marks=cuda_only))  # the last: the 8M-token headline


@pytest.mark.parametrize("backend", ["triton", pytest.param("native", marks=native_cuda("gae_cuda"))])
@pytest.mark.parametrize("shape", GAE_SHAPES)
def test_gae_matches_fp64(shape, backend):
    r, v, m = _gae_inputs(*shape)
    kw = dict(gamma=0.99, lam=0.95)
    ref_adv, ref_ret = reference.gae(r.double(), v.double(), m, **kw)
    with use_backend(backend):
        adv, ret = gae(r, v, m, **kw)
        adv_w, ret_w = gae(r, v, m, whiten=True, **kw)
    # error grows with the scan length (1 / (1 - gamma * lam) terms): allow 1e-5 relative to the magnitude
    close = dict(atol=1e-5 * max(1.0, float(ref_adv.abs().max())), rtol=1e-5)
    torch.testing.assert_close(adv.double(), ref_adv, **close)
    torch.testing.assert_close(ret.double(), ref_ret, **close)
    torch.testing.assert_close(ret_w.double(), ref_ret, **close)
    torch.testing.assert_close(adv_w.double(), reference.masked_whiten(ref_adv, m), **close)


@pytest.mark.parametrize("backend", ["triton", pytest.param("native", marks=native_cuda("gae_cuda"))])
def test_gae_packed_matches_fp64(backend):
    lengths = [5, 1, 0, 37] if DEVICE.type == "cpu" else [5, 1, 0, 3000, 37, 2048, 999, 300]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    total = int(cu[-1])
    r, v = torch.randn(total, device=DEVICE), torch.randn(total, device=DEVICE)
    m = torch.rand(total, device=DEVICE) < 0.85
    with use_backend(backend):
        adv, ret = gae_packed(r, v, m, cu, gamma=1.0, lam=0.95)
    ref_adv, ref_ret = reference.gae_packed(r.double(), v.double(), m, cu, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-4, rtol=1e-5)
