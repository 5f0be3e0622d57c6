"""ppo_policy_loss / value_loss: every backend vs float64 references (loss, gradient, stats), hand-computed cases,
fully masked batches, sharding invariance, non-finite inputs and bad input."""
import math

import pytest
import torch
from _backends import DEVICE, HAS_TRITON, TRITON, native
from _ppo_common import random_mask
from conftest import tol

from rlhf_fast import _native
from rlhf_fast.kernels import loss_layout
from rlhf_fast.ops import PPOAgg, PPOClip, losses, ppo_policy_loss, reference, use_backend, value_loss

BACKENDS = ["torch", TRITON]  # policy loss
VALUE_BACKENDS = ["torch", native("ppo_value_partials_cpu", cpu_only=True), TRITON]
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")
CLIPS = [dict(), dict(clip=PPOClip(0.2, 0.28)), dict(clip=PPOClip(0.1, dual=3.0))]


def _policy_inputs(b, t, dtype, empty_rows=(1,)):
    logp = (-torch.rand(b, t, device=DEVICE) * 3).to(dtype)
    old = (logp.float() + 0.4 * torch.randn(b, t, device=DEVICE)).to(dtype)
    adv = torch.randn(b, t, device=DEVICE).to(dtype)
    return logp, old, adv, random_mask(b, t, empty_rows=[r for r in empty_rows if r < b])


def _check_policy(logp, old, adv, mask, **kw):
    x = logp.clone().requires_grad_(True)
    loss, st = ppo_policy_loss(x, old, adv, mask, **kw)
    assert isinstance(st, losses.PolicyLossStats) and loss.dim() == 0
    assert st.clip_frac.dtype == loss.dtype == losses._compute_dtype(logp) and st.nonfinite.dtype == torch.int64
    x64 = logp.double().requires_grad_(True)
    ref_loss, ref_st = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, **kw)
    t = tol(torch.float32)  # math runs in float32 (float64 for float64 inputs) on every backend
    t = tol(torch.float64) if logp.dtype == torch.float64 else t
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **t)
    g = torch.autograd.grad(loss, x)[0]
    g_ref = torch.autograd.grad(ref_loss, x64)[0]
    assert g.dtype == logp.dtype
    torch.testing.assert_close(g.double(), g_ref, **(tol(logp.dtype) if logp.dtype != torch.float32 else t))
    for name in ref_st:
        torch.testing.assert_close(getattr(st, name).double(), ref_st[name].double(), msg=name, **t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("shape", [(3, 1), (5, 41), (2, 1100)])
def test_policy_loss_matches_fp64(backend, dtype, shape):
    logp, old, adv, mask = _policy_inputs(*shape, dtype)
    with use_backend(backend):
        for agg in AGGS:
            for kw in CLIPS:
                _check_policy(logp, old, adv, mask, agg=agg, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_hand_computed(backend):
    # logp - old = 1 -> ratio e. A = +1: max(-e, -1.2) = -1.2 (clipped, no gradient); A = -1: max(e, 1.2) = e,
    # gradient -A r = e; dual clip 2 with A = -1: min(e, 2) = 2 (clipped); clip_high 0.28 with A = +1: -1.28.
    one = torch.ones(1, 1, dtype=torch.float64, device=DEVICE)
    cases = [(1.0, {}, -1.2, 0.0, 1.0), (-1.0, {}, math.e, math.e, 0.0),
             (-1.0, dict(clip=PPOClip(dual=2.0)), 2.0, 0.0, 1.0),
             (-1.0, dict(clip=PPOClip(dual=3.0)), math.e, math.e, 0.0),
             (1.0, dict(clip=PPOClip(high=0.28)), -1.28, 0.0, 1.0)]
    with use_backend(backend):
        for a, kw, want, want_grad, want_clip in cases:
            x = one.clone().requires_grad_(True)
            loss, st = ppo_policy_loss(x, torch.zeros_like(one), a * one, one, **kw)
            loss.backward()
            assert loss.item() == pytest.approx(want, abs=1e-12), kw
            assert x.grad.item() == pytest.approx(want_grad, abs=1e-12)
            assert st.clip_frac.item() == want_clip and st.ratio_max.item() == pytest.approx(math.e)
            assert st.approx_kl.item() == pytest.approx(math.e - 2)  # r - 1 - log r


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_fully_masked_batch_gives_zero_loss_and_grads(backend, agg):
    logp, old, adv, _ = _policy_inputs(3, 17, torch.float32)
    mask = torch.zeros(3, 17, dtype=torch.bool, device=DEVICE)
    with use_backend(backend if backend != "native" else None):  # the policy loss has no native kernel
        x = logp.clone().requires_grad_(True)
        loss, st = ppo_policy_loss(x, old, adv, mask, agg=agg)
        loss.backward()
        assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))
        assert (st.clip_frac.item(), st.approx_kl.item(), st.ratio_mean.item(), st.ratio_min.item(),
                st.ratio_max.item(), st.nonfinite.item()) == (0, 0, 1, 1, 1, 0)
    with use_backend(backend):
        v = logp.clone().requires_grad_(True)
        vl, vs = value_loss(v, old, adv, mask, agg=agg)
        vl.backward()
        assert vl.item() == 0 and torch.equal(v.grad, torch.zeros_like(v))
        assert all(math.isfinite(s.item()) for s in vs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"))
def test_global_normalisers_make_loss_invariant_to_sharding(backend, agg):
    logp, old, adv, mask = _policy_inputs(6, 23, torch.float64, empty_rows=(2,))
    n_tok, n_seq = int(mask.sum()), int(mask.any(-1).sum())
    # the global count as an int and as a 1-element tensor (what a data-parallel all-reduce gives)
    globals_ = (dict(num_tokens=n_tok), dict(num_tokens=torch.tensor(n_tok))) if agg == "token-mean" else \
        (dict(num_seqs=n_seq), dict(num_seqs=torch.tensor([n_seq])))
    with use_backend(backend):
        x = logp.clone().requires_grad_(True)
        full, _ = ppo_policy_loss(x, old, adv, mask, agg=agg)
        g_full = torch.autograd.grad(full, x)[0]
        for kw in globals_:
            x2 = logp.clone().requires_grad_(True)
            shards = [ppo_policy_loss(x2[s], old[s], adv[s], mask[s], agg=PPOAgg(agg, **kw))[0]
                      for s in (slice(0, 2), slice(2, 6))]
            g_sharded = torch.autograd.grad(sum(shards), x2)[0]
            torch.testing.assert_close(sum(shards), full, **tol(torch.float64))
            torch.testing.assert_close(g_sharded, g_full, **tol(torch.float64))


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_nonfinite_inputs_are_dropped_and_flagged(backend):
    logp, old, adv, mask = _policy_inputs(3, 9, torch.float32, empty_rows=())
    mask[:, :3] = True
    adv[0, 0], logp[1, 1], old[2, 2] = float("nan"), float("-inf"), float("inf")
    logp[0, 8], mask[0, 8] = float("nan"), False  # a masked NaN is ignored and not counted
    with use_backend(backend if backend != "native" else None):  # the policy loss has no native kernel
        x = logp.clone().requires_grad_(True)
        loss, st = ppo_policy_loss(x, old, adv, mask)
        loss.backward()
        assert st.nonfinite.item() == 3 and torch.isfinite(loss) and torch.isfinite(x.grad).all()
        clean = mask.clone()
        clean[0, 0] = clean[1, 1] = clean[2, 2] = False
        want, _ = ppo_policy_loss(torch.nan_to_num(logp), torch.nan_to_num(old), torch.nan_to_num(adv), clean)
        torch.testing.assert_close(loss, want)
    with use_backend(backend):
        values = torch.randn(3, 9, device=DEVICE)
        values[0, 0] = float("nan")
        vl, vs = value_loss(values, values.clone(), torch.randn(3, 9, device=DEVICE), mask)
        assert vs.nonfinite.item() == 1 and torch.isfinite(vl)


def _check_value(v, vo, ret, mask, **kw):
    x = v.clone().requires_grad_(True)
    loss, st = value_loss(x, vo, ret, mask, **kw)
    assert isinstance(st, losses.ValueLossStats) and st.clip_frac.dtype == loss.dtype == losses._compute_dtype(v)
    x64 = v.double().requires_grad_(True)
    ref_loss, ref_st = reference.value_loss(x64, vo.double(), ret.double(), mask, **kw)
    t = tol(torch.float64) if v.dtype == torch.float64 else tol(torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **t)
    g, g_ref = torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref_loss, x64)[0]
    torch.testing.assert_close(g.double(), g_ref, **(tol(v.dtype) if v.dtype != torch.float32 else t))
    for name in ref_st:
        torch.testing.assert_close(getattr(st, name).double(), ref_st[name].double(), msg=name, **t)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("shape", [(3, 1), (4, 41), (2, 1100)])
def test_value_loss_matches_fp64(backend, dtype, shape):
    v = torch.randn(*shape, device=DEVICE).to(dtype)
    vo = (v.float() + 0.3 * torch.randn(*shape, device=DEVICE)).to(dtype)
    ret = torch.randn(*shape, device=DEVICE).to(dtype)
    mask = random_mask(*shape, empty_rows=(1,))
    with use_backend(backend):
        for agg in AGGS:
            for clip in (0.2, None):
                _check_value(v, vo, ret, mask, agg=agg, clip=clip)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_value_hand_computed(backend):
    # v = 2, v_old = 0, R = 0, c = 0.5: l1 = 4, clip(v) = 0.5, l2 = 0.25 -> 0.5 * 4 = 2, grad v - R = 2.
    # v = 1, v_old = 0, R = 3, c = 0.5: l1 = 4, clip(v) = 0.5, l2 = 6.25 -> 3.125 (clipped, grad 0).
    f = lambda x: torch.tensor([[x]], dtype=torch.float64, device=DEVICE)  # noqa: E731
    with use_backend(backend):
        for v, ret, want, want_grad, clipped in ((2.0, 0.0, 2.0, 2.0, 0.0), (1.0, 3.0, 3.125, 0.0, 1.0)):
            x = f(v).requires_grad_(True)
            loss, st = value_loss(x, f(0.0), f(ret), f(1.0), clip=0.5)
            loss.backward()
            assert (loss.item(), x.grad.item(), st.clip_frac.item()) == (want, want_grad, clipped)
        vals = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64, device=DEVICE)
        _, st = value_loss(vals, vals, vals, torch.ones_like(vals))
        assert st.explained_variance.item() == 1.0


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_kernel_partials_and_grads_write_every_element(backend):
    if backend == "triton" and not HAS_TRITON or backend == "native" and not _native.has("ppo_value_partials_cpu"):
        pytest.skip(f"{backend} loss kernels unavailable")
    kp = losses._kernels(backend)
    logp, old, adv, mask = _policy_inputs(3, 1100, torch.float32)
    m8 = mask.view(torch.uint8)
    chunks, dt = (2, torch.float32) if backend == "triton" else (1, torch.float64)
    w = torch.ones(3, dtype=dt, device=DEVICE)
    checks = [(kp.value_partials, kp.value_backward, loss_layout.V_K, (0.2,))]
    if backend == "triton":
        checks.append((kp.policy_partials, kp.policy_backward, loss_layout.P_K, (PPOClip(0.2, 0.2, 3.0),)))
    for fwd, bwd, k, args in checks:
        part = torch.full((3, chunks, k), float("nan"), dtype=dt, device=DEVICE)
        fwd(logp, old, adv, m8, *args, part=part)
        assert not part.isnan().any()
        grad = torch.full_like(logp, float("nan"))
        bwd(logp, old, adv, m8, w, grad, *args)
        assert not grad.isnan().any() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_inputs_give_zero_loss(backend, shape):
    x = torch.randn(shape, device=DEVICE)
    mask = torch.ones(shape, device=DEVICE)
    with use_backend(backend if backend != "native" else None):
        loss, st = ppo_policy_loss(x.requires_grad_(True), x, x, mask)
        loss.backward()
        assert loss.item() == 0 and st.ratio_min.item() == 1 and x.grad.shape == shape
    with use_backend(backend):
        assert value_loss(x, x, x, mask)[0].item() == 0


def test_token_weights_hand_computed():
    """PPOAgg.token_weights, the one definition of the modes: rows with 2, 0 and 1 valid tokens."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    w = lambda *args, **kw: PPOAgg(*args, **kw).token_weights(mask)[mask].tolist()  # noqa: E731
    assert w("token-sum") == [1, 1, 1]
    assert w("token-mean") == [1 / 3] * 3 and w("token-mean", num_tokens=6) == [1 / 6] * 3
    assert w("seq-mean-token-sum") == [1 / 2] * 3 and w("seq-mean-token-sum", num_seqs=3) == [1 / 3] * 3
    assert w("seq-mean-token-mean") == [1 / 4, 1 / 4, 1 / 2]
    assert w("seq-mean-token-mean", num_seqs=torch.tensor(4)) == [1 / 8, 1 / 8, 1 / 4]
    assert w("seq-mean-token-sum-norm") == [1 / 3] * 3 and w("seq-mean-token-sum-norm", norm=12.5) == [0.08] * 3
    assert PPOAgg(num_tokens=0).token_weights(mask).sum() == 3  # a normaliser of 0 counts as 1
    tok = torch.tensor([[1.0, 2.0, float("nan")], [float("inf")] * 3, [0.0, 4.0, 0.0]])
    assert PPOAgg("seq-mean-token-mean").aggregate(tok, mask).item() == pytest.approx((1.5 + 4) / 2)


def test_bad_input_is_rejected_with_clear_errors():
    logp, old, adv, mask = _policy_inputs(2, 5, torch.float32)
    with pytest.raises(ValueError, match="old_logp must have the same shape"):
        ppo_policy_loss(logp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match="mask must have the same shape"):
        ppo_policy_loss(logp, old, adv, mask[:1])
    with pytest.raises(ValueError, match="logp must be 2-D"):
        ppo_policy_loss(logp[0], old[0], adv[0], mask[0])
    with pytest.raises(ValueError, match="only 0 and 1"):
        ppo_policy_loss(logp, old, adv, mask.float() * 2)
    with pytest.raises(TypeError, match="advantages must have dtype"):
        ppo_policy_loss(logp, old, adv.long(), mask)
    with pytest.raises(ValueError, match="PPOAgg.mode must be one of"):
        ppo_policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(TypeError, match="agg must be a PPOAgg"):
        ppo_policy_loss(logp, old, adv, mask, agg=None)
    with pytest.raises(ValueError, match="num_seqs is only used"):
        ppo_policy_loss(logp, old, adv, mask, agg=PPOAgg("token-mean", num_seqs=4))
    with pytest.raises(ValueError, match="num_tokens must be a non-negative finite number"):
        ppo_policy_loss(logp, old, adv, mask, agg=PPOAgg(num_tokens=-1))
    with pytest.raises(ValueError, match="num_tokens must be a single non-negative number"):
        PPOAgg(num_tokens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="norm is only used by the modes"):
        PPOAgg("token-sum", norm=3.0)
    with pytest.raises(ValueError, match="PPOClip.level must be one of"):
        PPOClip(level="seq")
    with pytest.raises(ValueError, match="is_weights must have the same shape as logp"):
        ppo_policy_loss(logp, old, adv, mask, is_weights=adv[:, :2])
    with pytest.raises(ValueError, match=r"advantages must have logp's shape \(2, 5\) or \(2,\)"):
        ppo_policy_loss(logp, old, adv[:, 0][:1], mask)
    with pytest.raises(ValueError, match="PPOClip.low"):
        ppo_policy_loss(logp, old, adv, mask, clip=PPOClip(low=-0.1))
    with pytest.raises(ValueError, match="PPOClip.dual must be a finite number > 1"):
        ppo_policy_loss(logp, old, adv, mask, clip=PPOClip(dual=0.5))
    with pytest.raises(TypeError, match="clip must be a PPOClip"):
        ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        value_loss(logp, old, adv, mask, clip=-1.0)
    with pytest.raises(ValueError, match="returns must have the same shape"):
        value_loss(logp, old, adv[:1], mask)


@pytest.mark.skipif(not _native.has("ppo_value_partials_cpu"), reason="rlhf_fast._C not built")
def test_native_call_names_the_bad_tensor():
    """`_native.call` checks each raw-pointer argument (dtype, device, contiguity) before the C function runs."""
    from rlhf_fast._native import arg, call
    from rlhf_fast.ops import _losses_native as kn

    v = torch.randn(3, 8)
    m8 = torch.ones(3, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ppo_value_partials_cpu: old_values must be contiguous"):
        kn.value_partials(v, v.t().contiguous().t(), v, m8, 0.2)
    with pytest.raises(TypeError, match=r"ppo_value_partials_cpu: partials must have dtype in \(float64\)"):
        kn.value_partials(v, v, v, m8, 0.2, part=torch.empty(3, 1, loss_layout.V_K))
    with pytest.raises(TypeError, match=r"gae_cpu: mask must have dtype in \(uint8\)"):
        call("gae_cpu", arg("rewards", v), arg("mask", m8.bool(), torch.uint8))
    with pytest.raises(ValueError, match=r"gae_cpu: values must be on cpu"):
        call("gae_cpu", arg("rewards", v), arg("values", v.to("meta")))
    with pytest.raises(ValueError, match=r"gae_cpu: rewards must be a cpu tensor; got device meta"):
        call("gae_cpu", arg("rewards", v.to("meta")))
