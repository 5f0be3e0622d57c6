"""kl_penalty: every kind and backend vs float64 (value and both gradients), hand values, clamping, bad input."""
import math

import pytest
import torch
from _backends import DEVICE, HAS_TRITON, TRITON
from conftest import tol

from rlhf_fast.ops import kl_penalty, reference, use_backend

KINDS = ("k1", "k2", "k3", "abs")


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("shape", [(41,), (3, 341)])
def test_matches_fp64_with_grads(backend, dtype, shape):
    logp = (-3 * torch.rand(shape, device=DEVICE)).to(dtype)
    ref_logp = (logp.float() + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype)
    g = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    with use_backend(backend):
        for kind in KINDS:
            x, y = logp.clone().requires_grad_(True), ref_logp.clone().requires_grad_(True)
            k = kl_penalty(x, y, kind)
            dx, dy = torch.autograd.grad((k * g.to(k.dtype)).sum(), (x, y))
            x64, y64 = logp.double().requires_grad_(True), ref_logp.double().requires_grad_(True)
            k64 = reference.kl_penalty(x64, y64, kind)
            dx64, dy64 = torch.autograd.grad((k64 * g).sum(), (x64, y64))
            assert k.dtype == dtype and dx.dtype == dtype
            torch.testing.assert_close(k.double(), k64.detach(), **tol(dtype), msg=kind)
            torch.testing.assert_close(dx.double(), dx64, **tol(dtype), msg=kind)
            torch.testing.assert_close(dy.double(), dy64, **tol(dtype), msg=kind)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_hand_values_and_small_ratio_accuracy(backend):
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    with use_backend(backend):
        # log ratio 1: k1 = 1, k2 = 1/2, k3 = e^-1 + 1 - 1 = 1/e, abs = 1; d k3 / d logp = 1 - 1/e.
        want = {"k1": 1.0, "k2": 0.5, "k3": math.exp(-1), "abs": 1.0}
        for kind, w in want.items():
            assert kl_penalty(one, zero, kind).item() == pytest.approx(w, rel=1e-14)
        x = one.clone().requires_grad_(True)
        kl_penalty(x, zero, "k3").backward()
        assert x.grad.item() == pytest.approx(1 - math.exp(-1), rel=1e-14)
        # k3 ~ lr^2 / 2 near 0: expm1 keeps float32 accurate where exp(-lr) - 1 + lr would cancel.
        lr = torch.tensor([1e-4, -3e-4, 2e-3], dtype=torch.float32)
        k3 = kl_penalty(lr, torch.zeros_like(lr), "k3")
        exact = torch.expm1(-lr.double()) + lr.double()
        assert ((k3.double() - exact).abs() / exact).max() < 1e-3


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_log_ratio_is_clamped_finite_values_and_grads(backend):
    logp = torch.tensor([100.0, -100.0, 19.0, -19.0], dtype=torch.float32)
    with use_backend(backend):
        for kind in KINDS:
            x = logp.clone().requires_grad_(True)
            k = kl_penalty(x, torch.zeros_like(logp), kind)
            k.sum().backward()
            assert torch.isfinite(k).all() and torch.isfinite(x.grad).all(), kind
            assert x.grad[:2].tolist() == [0.0, 0.0], kind  # the clamp is active: no gradient
        assert kl_penalty(logp[1:2], torch.zeros(1), "k3").item() == pytest.approx(math.exp(20) - 21, rel=1e-6)


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_writes_every_element():
    from rlhf_fast.kernels import ppo_losses as kp

    a, b = torch.randn(1500, device=DEVICE), torch.randn(1500, device=DEVICE)
    out = torch.full_like(a, float("nan"))
    kp.kl_forward(a, b, out, "k2")
    dlr = torch.full_like(a, float("nan"))
    kp.kl_backward(a, b, torch.ones_like(a), dlr, "k3")
    assert not out.isnan().any() and not dlr.isnan().any()


def test_bad_input():
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="ref_logp must have the same shape"):
        kl_penalty(a, a[:, :3])
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_penalty(a, a, "k4")
    with pytest.raises(TypeError, match="logp must have dtype"):
        kl_penalty(a.long(), a)
    with pytest.raises(TypeError, match="ref_logp must be a torch.Tensor"):
        kl_penalty(a, 0.0)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_nonfinite_inputs_give_the_same_answer_on_every_backend(backend):
    """A NaN log ratio (a NaN input, or both inputs the same infinity) gives NaN with zero gradient; an infinite log
    ratio is clamped to +-20 like any |lr| > 20 (zero gradient). The same on every backend."""
    nan, inf = float("nan"), float("inf")
    logp = torch.tensor([nan, 0.3, inf, -inf, inf, 0.2, nan, -1.0], device=DEVICE)
    ref_logp = torch.tensor([0.1, nan, 0.0, 0.0, inf, -inf, nan, -1.5], device=DEVICE)
    is_nan = torch.tensor([True, True, False, False, True, False, True, False], device=DEVICE)
    at_20 = {"k1": 20.0, "k2": 200.0, "k3": math.expm1(-20.0) + 20.0, "abs": 20.0}
    with use_backend(backend):
        for kind in KINDS:
            x, y = logp.clone().requires_grad_(True), ref_logp.clone().requires_grad_(True)
            k = kl_penalty(x, y, kind)
            dx, dy = torch.autograd.grad(k.sum(), (x, y))
            assert torch.equal(k.isnan(), is_nan), kind
            assert k[2].item() == pytest.approx(at_20[kind], rel=1e-6) and k[5].item() == k[2].item()
            want = reference.kl_penalty(logp.double(), ref_logp.double(), kind)
            torch.testing.assert_close(k[~is_nan].double(), want[~is_nan], rtol=1e-6, atol=1e-6)
            assert torch.isfinite(dx).all() and torch.isfinite(dy).all()
            assert (dx[:7] == 0).all() and (dy[:7] == 0).all() and dx[7] != 0
