"""What GRPO-family runs feed the policy losses: per-token importance weights, (batch,) advantages, the constant
normaliser (Dr. GRPO), the sequence-level ratio (GSPO) and clip-higher (DAPO), composed, on every backend of
`ppo_policy_loss` and `ppo_loss_from_hidden`: against the float64 references, against the peers' formulas written
out here, and the fused step against the separate ops (forward and backward)."""
import math

import pytest
import torch
from _backends import DEVICE, HAS_TRITON, NATIVE_LOGPROBS, TRITON
from _ppo_common import random_mask
from conftest import tol

from rlhf_fast.kernels import loss_layout
from rlhf_fast.ops import (KLTerm, PPOAgg, PPOClip, kl_penalty, linear_token_logprobs, losses, ppo_loss_from_hidden,
                           ppo_policy_loss, reference, use_backend)

BACKENDS = ["torch", TRITON]
FUSED_BACKENDS = ["torch", NATIVE_LOGPROBS, TRITON]
# (clip, agg): clip-higher + Dr. GRPO's constant normaliser, GSPO (its tiny clip range) per sequence, GSPO with a
# dual clip and token-mean, DAPO (clip-higher, token-mean)
SPECS = [(PPOClip(0.2, 0.28), PPOAgg("seq-mean-token-sum-norm", norm=64.0)),
         (PPOClip(3e-4, 4e-4, level="sequence"), PPOAgg("seq-mean-token-mean")),
         (PPOClip(0.1, 0.3, 3.0, level="sequence"), PPOAgg("token-mean")),
         (PPOClip(0.2, 0.28), PPOAgg("seq-mean-token-sum-norm"))]


def _inputs(b, t, dtype, *, per_seq_adv=False, scale=0.4, empty_rows=(1,)):
    logp = (-torch.rand(b, t, device=DEVICE) * 3).to(dtype)
    old = (logp.float() + scale * torch.randn(b, t, device=DEVICE)).to(dtype)
    adv = torch.randn(b, device=DEVICE) if per_seq_adv else torch.randn(b, t, device=DEVICE)
    isw = (0.25 + 1.5 * torch.rand(b, t, device=DEVICE)).to(dtype)
    return logp, old, adv.to(dtype), isw, random_mask(b, t, empty_rows=[r for r in empty_rows if r < b])


def _check(logp, old, adv, isw, mask, clip, agg):
    x = logp.clone().requires_grad_(True)
    loss, st = ppo_policy_loss(x, old, adv, mask, clip=clip, agg=agg, is_weights=isw)
    x64 = logp.double().requires_grad_(True)
    ref_loss, ref_st = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, clip=clip, agg=agg,
                                                 is_weights=None if isw is None else isw.double())
    t = tol(torch.float64) if logp.dtype == torch.float64 else tol(torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **t)
    g, g_ref = torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref_loss, x64)[0]
    assert g.dtype == logp.dtype
    torch.testing.assert_close(g.double(), g_ref, **(tol(logp.dtype) if logp.dtype != torch.float32 else t))
    for name in ref_st:
        torch.testing.assert_close(getattr(st, name).double(), ref_st[name].double(), msg=name, **t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("shape", [(3, 1), (5, 41)])
def test_grpo_options_match_fp64(backend, dtype, shape):
    tok_adv, seq_adv = (_inputs(*shape, dtype, per_seq_adv=p) for p in (False, True))
    with use_backend(backend):
        for i, (clip, agg) in enumerate(SPECS):  # (batch, T) and (batch,) advantages in turn, with weights
            logp, old, adv, isw, mask = seq_adv if i % 2 else tok_adv
            _check(logp, old, adv, isw, mask, clip, agg)
        logp, old, adv, _, mask = seq_adv
        _check(logp, old, adv, None, mask, *SPECS[1])  # GSPO without weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_sequence_level_and_weights(backend):
    logp, old, adv, isw, mask = _inputs(2, 1100, torch.float32, per_seq_adv=True, scale=0.05)
    with use_backend(backend):
        _check(logp, old, adv, isw, mask, PPOClip(0.02, 0.03, level="sequence"), PPOAgg("seq-mean-token-mean"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_sequence_sum_level_matches_fp64(backend, dtype):
    """The whole sequence's likelihood ratio, its exact gradient reaching every token (per-token advantages and
    weights too): kernels and torch path == the float64 autograd reference."""
    with use_backend(backend):
        for per_seq_adv, agg in ((True, PPOAgg("seq-mean-token-mean")), (False, PPOAgg("token-mean"))):
            logp, old, adv, isw, mask = _inputs(5, 41, dtype, per_seq_adv=per_seq_adv, scale=0.03)
            _check(logp, old, adv, isw, mask, PPOClip(0.1, 0.2, 3.0, level="sequence-sum"), agg)
    x = logp.double().requires_grad_(True)
    loss, _ = reference.ppo_policy_loss(x, old.double(), adv.double(), mask, agg=agg,
                                        clip=PPOClip(0.1, 0.2, 3.0, level="sequence-sum"))
    g = torch.autograd.grad(loss, x)[0]
    assert (g != 0).sum() > 10  # the check above is not vacuous: most rows are unclipped


def _verl_vanilla(logp, old, adv, mask, isw, lo, hi, c):
    """verl core_algos.compute_policy_loss_vanilla + agg_loss("token-mean"), written out (float64)."""
    ratio = torch.exp((logp - old).clamp(-20, 20))
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - lo, 1 + hi)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.minimum(-adv * c, clip1)
    pg = torch.where(adv < 0, clip2, clip1) * isw
    return (pg * mask).sum() / mask.sum()


def _gspo(logp, old, adv, mask, lo, hi):
    """verl core_algos.compute_policy_loss_gspo + agg_loss("seq-mean-token-mean"), written out (float64)."""
    n = mask.sum(-1)
    seq = ((logp - old) * mask).sum(-1) / n
    s = torch.exp(logp - logp.detach() + seq.detach()[:, None])
    pg = torch.maximum(-adv * s, -adv * s.clamp(1 - lo, 1 + hi))
    return ((pg * mask).sum(-1) / n).sum() / (n > 0).sum()


def _trl(logp, old, adv, mask, lo, hi, *, level, loss_type, max_len=None):
    """TRL GRPOTrainer._compute_loss for loss_type grpo / dr_grpo, importance_sampling_level token / sequence (the
    sequence ratio differentiated through the mean), written out (float64)."""
    lr = logp - old
    if level == "sequence":
        lr = ((lr * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
    c1 = torch.exp(lr)
    ptl = -torch.minimum(c1 * adv[:, None], c1.clamp(1 - lo, 1 + hi) * adv[:, None])
    if loss_type == "grpo":
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return (ptl * mask).sum() / (ptl.shape[0] * max_len)


def _trl_rloo(logp, old, adv, mask, lo, hi):
    """TRL RLOOTrainer._compute_loss: the sequence log-likelihood ratio, one loss per sequence, mean (float64)."""
    coef_1 = torch.exp((logp * mask).sum(1) - (old * mask).sum(1))
    coef_2 = coef_1.clamp(1 - lo, 1 + hi)
    return (-torch.minimum(coef_1 * adv, coef_2 * adv)).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_peers_formulas(backend):
    b, t = 6, 13
    logp, old, adv_seq, isw, mask = _inputs(b, t, torch.float64, per_seq_adv=True, scale=0.2, empty_rows=())
    mask[:, 0] = True  # no empty row: TRL's grpo mean runs over every row
    adv_tok = torch.randn(b, t, dtype=torch.float64, device=DEVICE)
    m = mask.double()
    old_near = logp + 0.02 * torch.randn_like(logp)  # sequence-sum ratios near 1: not every row clipped
    cases = [  # (peer loss of x, our loss of x)
        (lambda x: _verl_vanilla(x, old, adv_tok, m, isw, 0.2, 0.28, 3.0),
         lambda x: ppo_policy_loss(x, old, adv_tok, mask, clip=PPOClip(0.2, 0.28, 3.0), is_weights=isw)[0]),
        (lambda x: _gspo(x, old, adv_tok, m, 3e-2, 4e-2),
         lambda x: ppo_policy_loss(x, old, adv_tok, mask, clip=PPOClip(3e-2, 4e-2, level="sequence"),
                                   agg="seq-mean-token-mean")[0]),
        (lambda x: _trl(x, old, adv_seq, m, 0.2, 0.28, level="token", loss_type="dr_grpo", max_len=t + 3),
         lambda x: ppo_policy_loss(x, old, adv_seq, mask, clip=PPOClip(0.2, 0.28),
                                   agg=PPOAgg("seq-mean-token-sum-norm", norm=b * (t + 3)))[0]),
        (lambda x: _trl(x, old, adv_seq, m, 0.05, 0.06, level="sequence", loss_type="grpo"),
         lambda x: ppo_policy_loss(x, old, adv_seq, mask, clip=PPOClip(0.05, 0.06, level="sequence"),
                                   agg="seq-mean-token-mean")[0]),
        (lambda x: _trl_rloo(x, old_near, adv_seq, m, 0.2, 0.28),
         lambda x: ppo_policy_loss(x, old_near, adv_seq, mask, clip=PPOClip(0.2, 0.28, level="sequence-sum"),
                                   agg=PPOAgg("seq-mean-token-mean", num_seqs=b))[0]),
    ]
    with use_backend(backend):
        for i, (peer, ours) in enumerate(cases):
            x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
            want, got = peer(x), ours(y)
            torch.testing.assert_close(got, want, **tol(torch.float64), msg=f"case {i}")
            torch.testing.assert_close(torch.autograd.grad(got, y)[0], torch.autograd.grad(want, x)[0],
                                       **tol(torch.float64), msg=f"case {i} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_weights_and_sequence_ratio(backend):
    # one token, logp - old = 1 (ratio e): A = +1 is clipped at 1.2 -> -1.2 * w_is; A = -1 -> e * w_is, grad e * w_is
    one = torch.ones(1, 1, dtype=torch.float64, device=DEVICE)
    with use_backend(backend):
        for a, want, want_grad in ((1.0, -1.2 * 0.5, 0.0), (-1.0, math.e * 0.5, math.e * 0.5)):
            x = one.clone().requires_grad_(True)
            loss, st = ppo_policy_loss(x, torch.zeros_like(one), a * one, one, is_weights=0.5 * one)
            (g,) = torch.autograd.grad(loss, x)
            assert loss.item() == pytest.approx(want, abs=1e-12) and g.item() == pytest.approx(want_grad, abs=1e-12)
        # a row with log ratios (0.5, 1.5): GSPO's ratio e on both tokens; A = -1, no clipping: each token's loss is
        # e and its gradient e (token-sum); a NaN weight drops the token and is counted
        x = torch.tensor([[0.5, 1.5]], dtype=torch.float64, device=DEVICE).requires_grad_(True)
        loss, st = ppo_policy_loss(x, torch.zeros_like(x), -torch.ones_like(x), torch.ones_like(x),
                                   clip=PPOClip(0.2, 5.0, level="sequence"), agg="token-sum")
        (g,) = torch.autograd.grad(loss, x)
        assert loss.item() == pytest.approx(2 * math.e) and g[0].tolist() == pytest.approx([math.e, math.e])
        assert st.ratio_min.item() == pytest.approx(math.e) and st.clip_frac.item() == 0
        loss, st = ppo_policy_loss(x, torch.zeros_like(x), -torch.ones_like(x), torch.ones_like(x),
                                   clip=PPOClip(0.2, 5.0, level="sequence"), agg="token-sum",
                                   is_weights=torch.tensor([[1.0, float("nan")]], dtype=torch.float64,
                                                           device=DEVICE))
        assert loss.item() == pytest.approx(math.exp(0.5)) and st.nonfinite.item() == 1


def test_sequence_advantages_equal_their_broadcast():
    logp, old, adv, isw, mask = _inputs(4, 9, torch.float32, per_seq_adv=True)
    for clip, agg in SPECS:
        a = ppo_policy_loss(logp, old, adv, mask, clip=clip, agg=agg, is_weights=isw)[0]
        b = ppo_policy_loss(logp, old, adv[:, None].expand(4, 9), mask, clip=clip, agg=agg, is_weights=isw)[0]
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_kernel_writes_every_element_with_weights_and_given_ratio():
    from rlhf_fast.kernels import ppo_losses as kp

    logp, old, adv, isw, mask = _inputs(3, 1100, torch.float32)
    m8 = mask.view(torch.uint8)
    clip = PPOClip(0.2, 0.3, 3.0)
    for lr_given in (False, True):
        part = torch.full((3, 2, loss_layout.P_K), float("nan"), device=DEVICE)
        kp.policy_partials(logp, old, adv, m8, clip, part=part, is_weights=isw, lr_given=lr_given)
        assert not part.isnan().any()
        grad = torch.full_like(logp, float("nan"))
        kp.policy_backward(logp, old, adv, m8, torch.ones(3, device=DEVICE), grad, clip, is_weights=isw,
                           lr_given=lr_given)
        assert not grad.isnan().any() and (grad[~mask] == 0).all()


# --- the fused step -------------------------------------------------------------------------------------------
def _batch(b, t, width, vocab, dtype=torch.float32, device="cpu"):
    hidden = torch.randn(b, t, width, device=device).to(dtype)
    weight = (torch.randn(vocab, width, device=device) / width**0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, (b, t), device=device)
    mask = torch.rand(b, t, device=device) > 0.3
    mask[0] = False  # an empty row
    # old_logp near the model's own (the sequence-sum ratio of a row stays near 1, so its gradient is not clipped)
    logp = reference.linear_token_logprobs(hidden.double(), weight.double(), labels)
    old = (logp + 0.02 * torch.randn(b, t, device=device, dtype=torch.float64)).to(dtype)
    adv = torch.randn(b, device=device).to(dtype)  # one advantage per sequence, as GRPO gives
    ref_logp = (torch.randn(b, t, device=device) * 0.3 - math.log(vocab)).to(dtype)
    isw = (0.5 + torch.rand(b, t, device=device)).to(dtype)
    return hidden, weight, labels, old, adv, mask, ref_logp, isw


FUSED_SPECS = [(PPOClip(0.2, 0.28, level="sequence"), PPOAgg("seq-mean-token-mean")),
               (PPOClip(0.2, 0.28, 3.0), PPOAgg("seq-mean-token-sum-norm", norm=40.0)),
               (PPOClip(0.2, 0.28, level="sequence-sum"), PPOAgg("token-mean"))]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_grpo_options_match_fp64_composition(backend):
    small = backend == "triton"
    dev = DEVICE if small else "cpu"
    hidden, weight, labels, old, adv, mask, ref_logp, isw = _batch(3, 7 if small else 19, 16, 40 if small else 211,
                                                                   device=dev)
    for clip, agg in FUSED_SPECS:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with use_backend(backend):
            loss, st = ppo_loss_from_hidden(h, w, labels, old, adv, mask, clip=clip, agg=agg,
                                            kl=KLTerm(ref_logp, 0.1, "k3"), entropy_coef=0.01, temperature=0.9,
                                            chunk_size=4, is_weights=isw)
        grads = torch.autograd.grad(loss * 1.3, (h, w))
        h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
        rl, rs = reference.ppo_loss_from_hidden(h64, w64, labels, old.double(), adv.double(), mask, clip=clip,
                                                agg=agg, kl=KLTerm(ref_logp.double(), 0.1, "k3"), entropy_coef=0.01,
                                                temperature=0.9, is_weights=isw.double())
        rg = torch.autograd.grad(rl * 1.3, (h64, w64))
        torch.testing.assert_close(loss.double(), rl.detach(), atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, rg):
            torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)
        for name in ("policy_loss", "kl", "entropy", "clip_frac", "approx_kl", "ratio_mean", "ratio_min"):
            torch.testing.assert_close(getattr(st, name).double(), rs[name].double(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


def test_fused_fp64_sequence_level_and_bf16():
    hidden, weight, labels, old, adv, mask, ref_logp, isw = _batch(2, 13, 8, 57, dtype=torch.float64)
    clip, agg = PPOClip(0.1, 0.3, 2.0, level="sequence"), PPOAgg("token-mean", num_tokens=11)
    h = hidden.clone().requires_grad_(True)
    loss, _ = ppo_loss_from_hidden(h, weight, labels, old, adv, mask, clip=clip, agg=agg, chunk_size=5,
                                   is_weights=isw)
    h2 = hidden.clone().requires_grad_(True)
    rl, _ = reference.ppo_loss_from_hidden(h2, weight, labels, old, adv, mask, clip=clip, agg=agg, is_weights=isw)
    torch.testing.assert_close(loss, rl, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(rl, h2)[0], atol=1e-10,
                               rtol=1e-10)
    hb, wb, lb, ob, ab, mb, _, ib = _batch(2, 9, 32, 211, dtype=torch.bfloat16)
    loss, st = ppo_loss_from_hidden(hb, wb, lb, ob, ab, mb, clip=clip, agg=agg, is_weights=ib)
    rl, _ = reference.ppo_loss_from_hidden(hb.double(), wb.double(), lb, ob.double(), ab.double(), mb, clip=clip,
                                           agg=agg, is_weights=ib.double())
    torch.testing.assert_close(loss.double(), rl, atol=2e-2, rtol=2e-2)


def test_fused_equals_separate_public_ops():
    """ppo_loss_from_hidden == linear_token_logprobs + ppo_policy_loss (same options) + agg(kl) - agg(entropy)."""
    hidden, weight, labels, old, adv, mask, ref_logp, isw = _batch(4, 17, 24, 333)
    for clip, agg in FUSED_SPECS:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, st = ppo_loss_from_hidden(h, w, labels, old, adv, mask, clip=clip, agg=agg,
                                        kl=KLTerm(ref_logp, 0.2, "k2"), entropy_coef=0.03, is_weights=isw)
        fused = torch.autograd.grad(loss, (h, w))
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, ent = linear_token_logprobs(h2, w2, torch.where(mask, labels, -100), return_entropy=True)
        pg, pst = ppo_policy_loss(logp, old, adv, mask, clip=clip, agg=agg, is_weights=isw)
        composed = pg + 0.2 * agg.aggregate(kl_penalty(logp, ref_logp, "k2"), mask) - 0.03 * agg.aggregate(ent, mask)
        torch.testing.assert_close(loss, composed, atol=1e-5, rtol=1e-5)
        for a, b in zip(fused, torch.autograd.grad(composed, (h2, w2))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st.clip_frac, pst.clip_frac)
        torch.testing.assert_close(st.ratio_mean, pst.ratio_mean, atol=1e-6, rtol=1e-5)


def test_fused_nonfinite_weights_are_dropped_and_bad_shapes_rejected():
    hidden, weight, labels, old, adv, mask, ref_logp, isw = _batch(3, 6, 8, 19)
    bad = isw.clone()
    bad[mask] = torch.where(torch.arange(int(mask.sum())) % 4 == 0, float("inf"), bad[mask])
    loss, st = ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, is_weights=bad,
                                    clip=PPOClip(level="sequence"))
    keep = mask & torch.isfinite(bad)
    want, _ = reference.ppo_loss_from_hidden(hidden.double(), weight.double(), labels, old.double(), adv.double(),
                                             keep, is_weights=isw.double(), clip=PPOClip(level="sequence"))
    assert st.nonfinite.item() == int((mask & ~keep).sum()) > 0
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"is_weights must have shape \(3, 6\)"):
        ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, is_weights=isw[:, :2])
    with pytest.raises(ValueError, match=r"advantages must have shape \(3, 6\)"):
        ppo_loss_from_hidden(hidden, weight, labels, old, adv[:2], mask)
    assert losses.token_advantages(adv, mask).shape == (3, 6)
