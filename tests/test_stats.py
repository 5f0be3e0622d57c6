"""masked_mean / masked_var / masked_whiten vs float64, empty masks, masked NaNs, gradients, backends, bad input."""
import pytest
import torch
from _backends import DEVICE, HAS_TRITON, TRITON
from _ppo_common import random_mask
from conftest import tol

from rlhf_fast.ops import masked_mean, masked_var, masked_whiten, reference, use_backend


@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 3, 41)])
def test_mean_and_var_against_boolean_indexing(shape):
    x = torch.randn(shape, dtype=torch.float64)
    m = torch.rand(shape) < 0.6
    m.view(-1)[0] = True
    sel = x[m]
    torch.testing.assert_close(masked_mean(x, m), sel.mean())
    torch.testing.assert_close(masked_var(x, m, unbiased=False), sel.var(unbiased=False))
    if sel.numel() > 1:
        torch.testing.assert_close(masked_var(x, m), sel.var())
    if len(shape) > 1:  # per row along the last dim; an empty row's mean is 0
        xf, mf = x.reshape(-1, shape[-1]), m.reshape(-1, shape[-1])
        want = torch.stack([xf[i][mf[i]].mean() if mf[i].any() else x.new_zeros(()) for i in range(len(xf))])
        torch.testing.assert_close(masked_mean(x, m, dim=-1).reshape(-1), want)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_whiten_hand_computed(backend):
    # Valid values 1, 2, 3 (the 100 is masked out): mean 2, unbiased variance 1 -> -1, 0, 1; scale only: 1, 2, 3.
    x = torch.tensor([[1.0, 100.0, 2.0, 3.0]], dtype=torch.float64, device=DEVICE)
    m = torch.tensor([[1, 0, 1, 1]], device=DEVICE)
    with use_backend(backend):
        torch.testing.assert_close(masked_whiten(x, m), torch.tensor([[-1.0, 0.0, 0.0, 1.0]], dtype=torch.float64,
                                                                     device=DEVICE), atol=1e-7, rtol=0)
        torch.testing.assert_close(masked_whiten(x, m, shift_mean=False),
                                   torch.tensor([[1.0, 0.0, 2.0, 3.0]], dtype=torch.float64, device=DEVICE),
                                   atol=1e-7, rtol=0)
    assert masked_mean(x, m).item() == 2 and masked_var(x, m).item() == 1


def test_empty_masks_give_zero_not_nan_and_masked_nans_are_ignored():
    x = torch.randn(4, 5)
    none = torch.zeros(4, 5, dtype=torch.bool)
    assert masked_mean(x, none).item() == 0 and masked_var(x, none).item() == 0
    assert (masked_whiten(x, none) == 0).all()
    one = none.clone()
    one[2, 3] = True
    assert masked_var(x, one).item() == 0  # unbiased variance of one element: defined as 0
    x[0, 0] = float("nan")
    m = torch.ones(4, 5, dtype=torch.bool)
    m[0, 0] = False
    assert torch.isfinite(masked_mean(x, m)) and torch.isfinite(masked_var(x, m))
    assert torch.isfinite(masked_whiten(x, m)).all()


def test_gradients_flow_through_mean_var_and_whiten():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    m = random_mask(3, 11, empty_rows=(1,), device="cpu")
    for f in (lambda t: masked_mean(t, m), lambda t: masked_var(t, m),
              lambda t: (masked_whiten(t, m) * torch.arange(11.0, dtype=torch.float64)).sum()):
        assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("shape", [(1, 1), (5, 77), (3, 1100), (2, 3, 9)])
def test_whiten_matches_fp64(backend, dtype, shape):
    x = (torch.randn(shape, device=DEVICE) * 3 + 2).to(dtype)
    m = torch.rand(shape, device=DEVICE) < 0.7
    with use_backend(backend):
        for shift in (True, False):
            got = masked_whiten(x, m, shift_mean=shift)
            want = reference.masked_whiten(x.double(), m, shift_mean=shift)
            assert got.dtype == dtype and got.shape == x.shape
            torch.testing.assert_close(got.double(), want, **tol(dtype))


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_whiten_writes_every_element():
    from rlhf_fast.kernels import whiten as kw

    x = torch.randn(3, 1100, device=DEVICE)
    m = torch.rand(3, 1100, device=DEVICE) < 0.5
    out = torch.full_like(x, float("nan"))
    kw.masked_whiten(x, m, out, shift_mean=True, eps=1e-8)
    assert not out.isnan().any() and (out[~m] == 0).all()


def test_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask must have the same shape"):
        masked_mean(x, torch.ones(4, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_var(x, torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="dim must be in"):
        masked_mean(x, torch.ones(3, 4), dim=2)
    with pytest.raises(TypeError, match="x must have dtype"):
        masked_whiten(x.long(), torch.ones(3, 4))


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_whiten_keeps_nonfinite_valid_elements_out_of_the_statistics(backend):
    x = torch.randn(3, 17, device=DEVICE)
    m = random_mask(3, 17)
    m[1, 3] = m[2, 5] = True
    x[1, 3], x[2, 5] = float("nan"), float("-inf")
    good = m & torch.isfinite(x)
    sel = x[good].double()
    want = torch.where(good, (x.double() - sel.mean()) / torch.sqrt(sel.var() + 1e-8), torch.zeros_like(sel[:1]))
    with use_backend(backend):
        out = masked_whiten(x, m)
    assert out[1, 3].isnan() and not torch.isfinite(out[2, 5]) and torch.isfinite(out[good]).all()
    torch.testing.assert_close(torch.where(good, out, 0.0).double(), want, atol=1e-5, rtol=1e-5)
