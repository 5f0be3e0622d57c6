"""ops.rollout_correction and the policy losses given rollout_logp: every mode against hand-computed values, the
float64 reference, verl's own rollout_corr_helper (tests/_peers.py) and TRL's vLLM importance-sampling formulas;
the loss and its gradient against the reference composition; NaN/Inf at masked and valid positions; mode "none"
bitwise equal to the loss without rollout_logp; rollout_logp == old_logp changes nothing in any mode; bad input."""
import math

import _peers
import pytest
import torch
from _backends import DEVICE, TRITON
from _ppo_common import random_mask
from conftest import tol

from rlhf_fast.ops import (KLTerm, PPOAgg, PPOClip, RolloutCorrection, RolloutCorrectionStats, ppo_loss_from_hidden,
                           ppo_policy_loss, reference, rollout_correction, use_backend)

CORRECTIONS = [
    RolloutCorrection(),
    RolloutCorrection("tis", cap=1.5),
    RolloutCorrection("tis", level="sequence", cap=2.0, lo=0.5),
    RolloutCorrection("mis", lo=0.8, hi=1.25),
    RolloutCorrection("mis", level="sequence", lo=0.5, hi=2.0),
    RolloutCorrection("icepop", lo=0.8, hi=1.25),
    RolloutCorrection("icepop", level="sequence", hi=2.0),
    RolloutCorrection("geo_mask", lo=0.95, hi=1.05),
]
IDS = [f"{c.mode}-{c.level}" for c in CORRECTIONS]
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _logps(b, t, dtype=torch.float32, spread=0.3, device=DEVICE):
    """(old_logp, rollout_logp, mask): ratios exp(N(0, spread^2)) on both sides of the bounds above."""
    old = -torch.rand(b, t, device=device) * 3
    rollout = old + spread * torch.randn(b, t, device=device)
    return old.to(dtype), rollout.to(dtype), random_mask(b, t, empty_rows=[1] if b > 1 else [], device=device)


def _assert_matches_reference(trainer, rollout, mask, corr, t):
    w, keep, st = rollout_correction(trainer, rollout, mask, corr)
    rw, rkeep, rst = reference.rollout_correction(trainer.double(), rollout.double(), mask, corr)
    assert isinstance(st, RolloutCorrectionStats) and keep.dtype == torch.bool
    assert torch.equal(keep, rkeep)
    assert (w is None) == (rw is None)
    if w is not None:
        assert w.dtype == (torch.float64 if trainer.dtype == torch.float64 else torch.float32) and not w.requires_grad
        torch.testing.assert_close(w.double(), rw, **t)
    for name in rst:
        torch.testing.assert_close(getattr(st, name).double(), rst[name].double(), **t, msg=name)
    return w, keep, st


# --- the op ---


def test_hand_computed():
    ratios = torch.tensor([[1.0, 1.5, 0.5, 3.0], [1.05, 0.98, 2.0, 7.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    rollout = torch.full_like(ratios, -1.0)
    trainer = rollout + ratios.log()
    trainer[1, 3], rollout[2, 0] = math.nan, -math.inf  # masked out: never read
    on = mask.bool()

    def run(corr):
        w, keep, st = rollout_correction(trainer, rollout, mask, corr)
        return w, keep.tolist(), st

    def close(w, rows):
        torch.testing.assert_close(w, torch.tensor(rows, dtype=torch.float64), rtol=1e-12, atol=0)

    w, keep, st = run(RolloutCorrection())
    assert w is None and keep == on.tolist()
    r = ratios[on]
    torch.testing.assert_close(st.k3_kl, (r - 1 - r.log()).mean())
    torch.testing.assert_close(st.max_abs_dlogp, torch.tensor(math.log(3.0), dtype=torch.float64))
    assert st.outside_10pct.item() == pytest.approx(4 / 7) and st.outside_1pct.item() == pytest.approx(6 / 7)
    assert st.masked_frac == 0 and st.weight_mean == 1 and st.nonfinite == 0
    w, keep, st = run(RolloutCorrection("tis", cap=2.0))
    close(w, [[1.0, 1.5, 0.5, 2.0], [1.05, 0.98, 2.0, 0.0], [0.0] * 4])
    assert keep == on.tolist()
    w, _, _ = run(RolloutCorrection("tis", level="sequence", cap=3.0, lo=0.9))  # W = 2.25, 2.058
    close(w, [[2.25] * 4, [2.058] * 3 + [0.0], [0.0] * 4])
    w, keep, st = run(RolloutCorrection("mis", lo=0.8, hi=1.25))
    assert w is None and keep == [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert st.masked_frac.item() == pytest.approx(4 / 7) and st.masked_seq_frac == 1
    w, keep, st = run(RolloutCorrection("icepop", lo=0.8, hi=1.25))
    close(w, [[1.0, 0.0, 0.0, 0.0], [1.05, 0.98, 0.0, 0.0], [0.0] * 4])
    assert keep == on.tolist()
    assert st.masked_frac.item() == pytest.approx(4 / 7) and st.weight_mean.item() == pytest.approx(3.03 / 7)
    _, keep, st = run(RolloutCorrection("mis", level="sequence", lo=0.5, hi=2.1))  # W = 2.25 out, 2.058 in
    assert keep == [[False] * 4, [True, True, True, False], [False] * 4]
    assert st.masked_frac.item() == pytest.approx(4 / 7) and st.masked_seq_frac.item() == pytest.approx(0.5)
    _, keep, _ = run(RolloutCorrection("geo_mask", lo=0.8, hi=1.25))  # G = 2.25^(1/4) = 1.225 in, 2.058^(1/3) out
    assert keep == [[True] * 4, [False] * 4, [False] * 4]


@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("shape", [(1, 1), (3, 41), (7, 341)])
def test_matches_reference(corr, dtype, shape):
    old, rollout, mask = _logps(*shape, dtype)
    t = tol(torch.float64) if dtype == torch.float64 else tol(torch.float32)  # computed in float32 (float64)
    _assert_matches_reference(old, rollout, mask, corr, t)


@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
def test_nonfinite(corr):
    old, rollout, mask = _logps(5, 23, torch.float32)
    clean = _assert_matches_reference(old, rollout, mask, corr, tol(torch.float32))
    bad_old, bad_rollout = old.clone(), rollout.clone()
    off = ~mask
    bad_old[off] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(int(off.sum())) % 3]
    bad_rollout[off] = math.nan
    w, keep, st = rollout_correction(bad_old, bad_rollout, mask, corr)  # masked out: nothing leaks, bitwise
    assert torch.equal(keep, clean[1]) and (w is None or torch.equal(w, clean[0]))
    assert all(torch.equal(a, b) for a, b in zip(st, clean[2]))
    on = mask.nonzero()
    (r0, c0), (r1, c1) = on[0].tolist(), on[-1].tolist()
    bad_old[r0, c0], bad_rollout[r1, c1] = math.nan, -math.inf  # valid: dropped (but by "none") and counted
    w, keep, st = _assert_matches_reference(bad_old, bad_rollout, mask, corr, tol(torch.float32))
    assert st.nonfinite == 2 and bool(keep[r0, c0]) == (corr.mode == "none")
    assert all(torch.isfinite(s).all() for s in st) and (w is None or torch.isfinite(w).all())


@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
def test_on_policy_changes_nothing(corr):
    old, _, mask = _logps(4, 19)
    w, keep, st = rollout_correction(old, old.clone(), mask, corr)
    assert torch.equal(keep, mask) and (w is None or torch.equal(w, mask.float()))
    assert st.k3_kl == 0 and st.max_abs_dlogp == 0 and st.outside_1pct == 0 and st.masked_frac == 0
    assert st.weight_mean == 1


def test_empty_and_fully_masked():
    for b, t in ((0, 5), (3, 0), (2, 4)):
        x = torch.zeros(b, t)
        for corr in CORRECTIONS:
            w, keep, st = rollout_correction(x, x, torch.zeros(b, t, dtype=torch.bool), corr)
            assert not keep.any() and st.k3_kl == 0 and st.masked_frac == 0 and st.weight_mean == 1


# --- the peers ---


@pytest.fixture(scope="module")
def verl_rc():
    try:
        _peers.install("verl")
        from verl.trainer.ppo import rollout_corr_helper
    except Exception as err:  # no package index here, or the helper does not import: nothing to compare against
        pytest.skip(f"verl's rollout_corr_helper is not available: {type(err).__name__}: {str(err)[:300]}")
    return rollout_corr_helper  # verl stays on sys.path, as in test_integration_verl (ray's atexit hook needs it)


def _verl_weights(rc, old, rollout, mask, level, threshold):
    w, _ = rc.compute_rollout_correction_weights(old - rollout, mask, rollout_is=level, rollout_is_threshold=threshold)
    return w


def _verl_keep(rc, old, rollout, mask, option, lo, hi):
    keep, _ = rc.compute_rollout_rejection_mask(old - rollout, mask, rollout_rs=option,
                                                rollout_rs_threshold=f"{1 / hi}_{1 / lo}")  # its k1: -log ratio
    return keep.bool()


def test_matches_verl(verl_rc):
    old, rollout, mask = _logps(6, 29, torch.float64, spread=0.3, device="cpu")
    m = mask.double()
    for level in ("token", "sequence"):
        w, keep, _ = rollout_correction(old, rollout, mask, RolloutCorrection("tis", level=level, cap=1.7))
        torch.testing.assert_close(w, _verl_weights(verl_rc, old, rollout, m, level, 1.7), rtol=1e-12, atol=0)
        assert torch.equal(keep, mask)
        lo, hi = (0.8, 1.25) if level == "token" else (0.4, 2.5)
        w, _, _ = rollout_correction(old, rollout, mask, RolloutCorrection("icepop", level=level, lo=lo, hi=hi))
        torch.testing.assert_close(w, _verl_weights(verl_rc, old, rollout, m, level, f"{lo}_{hi}"), rtol=1e-12,
                                   atol=0)
        _, keep, _ = rollout_correction(old, rollout, mask, RolloutCorrection("mis", level=level, lo=lo, hi=hi))
        option = "token_k1" if level == "token" else "seq_sum_k1"
        assert torch.equal(keep, _verl_keep(verl_rc, old, rollout, m, option, lo, hi))
    _, keep, st = rollout_correction(old, rollout, mask, RolloutCorrection("geo_mask", lo=0.95, hi=1.04))
    assert 0 < st.masked_frac < 1
    assert torch.equal(keep, _verl_keep(verl_rc, old, rollout, m, "seq_mean_k1", 0.95, 1.04))
    metrics = verl_rc.compute_offpolicy_metrics(old, rollout, m)
    assert st.k3_kl.item() == pytest.approx(metrics["k3_kl"], rel=1e-9)


def _trl_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer's `importance_sampling_ratio` for `vllm_importance_sampling_mode`, written out: exp of
    the masked (per-row summed, sequence_*) log difference, clamped to [clip_min, clip_max] (*_truncate) or 0
    outside it (*_mask); it multiplies the per-token loss, whose normaliser keeps every completion token."""
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo, hi = -math.inf if clip_min is None else clip_min, math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl_formulas(level):
    old, rollout, mask = _logps(5, 17, torch.float64, device="cpu")
    m = mask.double()
    for clip_min, clip_max in ((None, 3.0), (0.5, 2.0)):
        w, keep, _ = rollout_correction(old, rollout, mask, RolloutCorrection("tis", level=level, cap=clip_max,
                                                                              lo=clip_min))
        torch.testing.assert_close(w, _trl_ratio(old, rollout, m, f"{level}_truncate", clip_min, clip_max) * m)
        assert torch.equal(keep, mask)
        w, keep, _ = rollout_correction(old, rollout, mask, RolloutCorrection("icepop", level=level, lo=clip_min,
                                                                              hi=clip_max))
        torch.testing.assert_close(w, _trl_ratio(old, rollout, m, f"{level}_mask", clip_min, clip_max) * m)
        assert torch.equal(keep, mask)


# --- the losses ---


def _policy_inputs(b, t, dtype):
    old, rollout, mask = _logps(b, t, dtype)
    logp = (old.float() + 0.2 * torch.randn(b, t, device=DEVICE)).to(dtype)
    return logp, old, rollout, torch.randn(b, t, device=DEVICE).to(dtype), mask


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
def test_policy_loss_matches_reference(backend, corr):
    logp, old, rollout, adv, mask = _policy_inputs(4, 37, torch.float32)
    isw = torch.rand_like(old) * 2
    for agg in AGGS:
        for given in (None, isw):
            x = logp.clone().requires_grad_(True)
            with use_backend(backend):
                loss, st = ppo_policy_loss(x, old, adv, mask, clip=PPOClip(0.2, 0.28, 3.0), agg=agg,
                                           is_weights=given, rollout_logp=rollout, rollout_correction=corr)
            (g,) = torch.autograd.grad(loss, x)
            w, keep, rst = reference.rollout_correction(old.double(), rollout.double(), mask, corr)
            if given is not None:
                w = given.double() if w is None else given.double() * w
            x64 = logp.double().requires_grad_(True)
            ref_loss, ref_st = reference.ppo_policy_loss(x64, old.double(), adv.double(), keep, is_weights=w,
                                                         clip=PPOClip(0.2, 0.28, 3.0), agg=agg)
            (g64,) = torch.autograd.grad(ref_loss, x64)
            t = tol(torch.float32)
            torch.testing.assert_close(loss.double(), ref_loss.detach(), **t)
            torch.testing.assert_close(g.double(), g64, **t)
            for name in ("clip_frac", "approx_kl", "ratio_mean", "nonfinite"):
                torch.testing.assert_close(getattr(st, name).double(), ref_st[name].double(), **t, msg=name)
            for name in rst:
                torch.testing.assert_close(getattr(st.rollout_correction, name).double(), rst[name].double(), **t,
                                           msg=name)


def _fused(batch, rollout, corr, *, is_weights=None):
    hidden, weight, labels, old, adv, mask, ref_logp = batch
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    kw = dict(clip=PPOClip(0.2, 0.28, 3.0), agg="seq-mean-token-mean", kl=KLTerm(ref_logp, 0.1), entropy_coef=0.01,
              temperature=0.9, chunk_size=8, is_weights=is_weights)
    extra = {} if rollout is None else dict(rollout_logp=rollout, rollout_correction=corr)
    loss, stats = ppo_loss_from_hidden(h, w, labels, old, adv, mask, **kw, **extra)
    return loss, stats, torch.autograd.grad(loss * 1.7, (h, w))


def _hidden_batch(b, t, width, vocab, device=DEVICE):
    hidden = torch.randn(b, t, width, device=device)
    weight = torch.randn(vocab, width, device=device) / width**0.5 * 2
    labels = torch.randint(0, vocab, (b, t), device=device)
    mask = random_mask(b, t, empty_rows=[0], device=device)
    old = torch.randn(b, t, device=device) * 0.3 - math.log(vocab)
    rollout = old + 0.3 * torch.randn(b, t, device=device)
    ref_logp = torch.randn(b, t, device=device) * 0.3 - math.log(vocab)
    return (hidden, weight, labels, old, torch.randn(b, t, device=device), mask, ref_logp), rollout


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
def test_fused_matches_reference(backend, corr):
    batch, rollout = _hidden_batch(3, 9, 16, 40)
    hidden, weight, labels, old, adv, mask, ref_logp = batch
    with use_backend(backend):
        loss, stats, grads = _fused(batch, rollout, corr)
    w, keep, rst = reference.rollout_correction(old.double(), rollout.double(), mask, corr)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_loss, ref_st = reference.ppo_loss_from_hidden(
        h64, w64, labels, old.double(), adv.double(), keep, clip=PPOClip(0.2, 0.28, 3.0),
        agg=PPOAgg("seq-mean-token-mean"), kl=KLTerm(ref_logp.double(), 0.1), entropy_coef=0.01, temperature=0.9,
        is_weights=w)
    ref_grads = torch.autograd.grad(ref_loss * 1.7, (h64, w64))
    torch.testing.assert_close(loss.double(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)
    for name in ("policy_loss", "kl", "entropy", "clip_frac"):
        torch.testing.assert_close(getattr(stats, name).double(), ref_st[name].double(), atol=1e-5, rtol=1e-5)
    for name in rst:
        torch.testing.assert_close(getattr(stats.rollout_correction, name).double(), rst[name].double(),
                                   **tol(torch.float32), msg=name)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_none_is_bitwise_today_and_on_policy_is_identity(backend):
    logp, old, rollout, adv, mask = _policy_inputs(3, 29, torch.float32)
    batch, hrollout = _hidden_batch(3, 9, 16, 40)

    def policy(**kw):
        x = logp.clone().requires_grad_(True)
        loss, st = ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", **kw)
        return loss, st, torch.autograd.grad(loss, x)

    with use_backend(backend):
        base, fused_base = policy(), _fused(batch, None, None)
        runs = [(policy(rollout_logp=rollout), _fused(batch, hrollout, None)),
                (policy(rollout_logp=rollout, rollout_correction=RolloutCorrection()),
                 _fused(batch, hrollout, RolloutCorrection()))]
        runs += [(policy(rollout_logp=old.clone(), rollout_correction=c), _fused(batch, batch[3].clone(), c))
                 for c in CORRECTIONS]
    for (loss, st, g), (floss, fst, fg) in runs:
        assert torch.equal(loss, base[0]) and torch.equal(g[0], base[2][0])
        assert all(torch.equal(a, b) for a, b in zip(st[:6], base[1][:6]))
        assert base[1].rollout_correction is None and st.rollout_correction is not None
        assert torch.equal(floss, fused_base[0]) and all(torch.equal(a, b) for a, b in zip(fg, fused_base[2]))
        assert all(torch.equal(a, b) for a, b in zip(fst[:9], fused_base[1][:9]))


@pytest.mark.parametrize("corr", [RolloutCorrection(), RolloutCorrection("tis")], ids=["none", "tis"])
def test_nonfinite_rollout_logp_in_the_loss(corr):
    logp, old, rollout, adv, mask = _policy_inputs(3, 13, torch.float32)
    rollout[~mask] = math.nan  # masked out: nothing leaks
    r, c = mask.nonzero()[0].tolist()
    rollout[r, c] = math.nan  # a valid token: dropped and counted, but by "none", which leaves the loss alone
    loss, st = ppo_policy_loss(logp, old, adv, mask, rollout_logp=rollout, rollout_correction=corr)
    dropped = mask.clone()
    dropped[r, c] = corr.mode == "none"
    want, want_st = ppo_policy_loss(logp, old, adv, dropped, is_weights=None if corr.mode == "none" else
                                    rollout_correction(old, rollout, dropped, corr)[0])
    assert torch.isfinite(loss) and torch.equal(loss, want)
    assert st.rollout_correction.nonfinite == 1 and st.nonfinite == want_st.nonfinite + (corr.mode != "none")
    assert all(torch.isfinite(s).all() for s in st.rollout_correction)


# --- bad input ---


@pytest.mark.parametrize("kw,match", [
    (dict(mode="seq"), "RolloutCorrection.mode"),
    (dict(mode="geo_mask", level="token", lo=0.9), "RolloutCorrection.level"),
    (dict(mode="tis", level="geometric"), "RolloutCorrection.level"),
    (dict(mode="tis", cap=0.5), "RolloutCorrection.cap"),
    (dict(mode="tis", cap=math.inf), "RolloutCorrection.cap"),
    (dict(mode="tis", cap=True), "RolloutCorrection.cap"),
    (dict(mode="tis", hi=2.0), "RolloutCorrection.hi"),
    (dict(mode="mis"), "RolloutCorrection.lo / RolloutCorrection.hi"),
    (dict(mode="mis", lo=1.2), "RolloutCorrection.lo"),
    (dict(mode="icepop", hi=0.9), "RolloutCorrection.hi"),
    (dict(mode="icepop", lo=-1.0, hi=2.0), "RolloutCorrection.lo"),
    (dict(mode="icepop", lo=math.nan, hi=2.0), "RolloutCorrection.lo"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutCorrection(**kw)


def test_bad_input():
    old, rollout, mask = _logps(2, 5)
    with pytest.raises(ValueError, match="rollout_logp must have the same shape"):
        rollout_correction(old, rollout[:, :3], mask)
    with pytest.raises(ValueError, match="mask must have trainer_logp's shape"):
        rollout_correction(old, rollout, mask[:, :3])
    with pytest.raises(TypeError, match="correction must be a RolloutCorrection"):
        rollout_correction(old, rollout, mask, "tis")
    with pytest.raises(ValueError, match="rollout_correction needs rollout_logp"):
        ppo_policy_loss(old, old, old, mask, rollout_correction=RolloutCorrection("tis"))
    with pytest.raises(TypeError, match="rollout_logp must have dtype"):
        ppo_policy_loss(old, old, old, mask, rollout_logp=mask)
