"""ppo_loss_from_hidden: equal to the float64 composition and to the separate public ops, hand-computed cases,
masks, non-finite inputs and bad input; with and without the final logit soft-cap (softcap)."""
import math

import pytest
import torch
from _backends import DEVICE, NATIVE_LOGPROBS, TRITON

from rlhf_fast.ops import (KLTerm, PPOAgg, PPOClip, kl_penalty, linear_token_logprobs, ppo_loss_from_hidden,
                           ppo_policy_loss, reference, use_backend)

AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")
BACKENDS = ["torch", NATIVE_LOGPROBS, TRITON]


def _batch(b, t, width, vocab, dtype=torch.float32, device="cpu"):
    hidden = torch.randn(b, t, width, device=device).to(dtype)
    weight = (torch.randn(vocab, width, device=device) / width**0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, (b, t), device=device)
    mask = torch.rand(b, t, device=device) > 0.3
    mask[0] = False  # an empty row
    old = (torch.randn(b, t, device=device) * 0.3 - math.log(vocab)).to(dtype)
    adv = torch.randn(b, t, device=device).to(dtype)
    ref_logp = (torch.randn(b, t, device=device) * 0.3 - math.log(vocab)).to(dtype)
    labels[~mask] = -100  # anything is allowed where mask is 0
    return hidden, weight, labels, old, adv, mask, ref_logp


def _fused_and_ref(batch, *, clip, agg, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01, temperature=0.9,
                   chunk_size=None, softcap=0.0):
    hidden, weight, labels, old, adv, mask, ref_logp = batch
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    kw = dict(entropy_coef=entropy_coef, clip=clip, temperature=temperature, softcap=softcap)
    loss, stats = ppo_loss_from_hidden(h, w, labels, old, adv, mask, agg=agg, chunk_size=chunk_size,
                                       kl=KLTerm(ref_logp, kl_coef, kl_kind), **kw)
    grads = torch.autograd.grad(loss * 1.7, (h, w))  # a non-unit upstream gradient
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_loss, ref_stats = reference.ppo_loss_from_hidden(h64, w64, labels, old.double(), adv.double(), mask,
                                                         agg=PPOAgg.of(agg), kl=KLTerm(ref_logp.double(), kl_coef,
                                                                                       kl_kind), **kw)
    ref_grads = torch.autograd.grad(ref_loss * 1.7, (h64, w64))
    return (loss, stats, grads), (ref_loss, ref_stats, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0])
def test_matches_fp64_composition(backend, agg, softcap):
    small = backend == "triton"
    batch = _batch(3, 7 if small else 23, 16, 40 if small else 301, device=DEVICE if small else "cpu")
    clip = PPOClip(0.2, 0.28, 3.0)
    with use_backend(backend):
        (loss, stats, grads), (rl, rs, rg) = _fused_and_ref(batch, clip=clip, agg=agg, chunk_size=8, softcap=softcap)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), rl.detach(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)
    for name in ("policy_loss", "kl", "entropy", "clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"):
        torch.testing.assert_close(getattr(stats, name).double(), rs[name].double(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("clip", [PPOClip(), PPOClip(0.1, 0.3), PPOClip(0.2, None, 2.0)])
def test_kl_kinds_clips_fp64(kl_kind, clip):
    batch = _batch(2, 13, 8, 57, dtype=torch.float64)
    (loss, _, grads), (rl, _, rg) = _fused_and_ref(batch, clip=clip, agg="seq-mean-token-mean", kl_kind=kl_kind,
                                                   kl_coef=0.5, entropy_coef=0.05, chunk_size=5,
                                                   softcap=1.5 if kl_kind == "k2" else 0.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, rl.detach(), atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_bias(backend):
    hidden, weight, labels, old, adv, mask, ref_logp = _batch(2, 6, 8, 45, dtype=torch.float64)
    bias = torch.randn(45, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    kw = dict(kl=KLTerm(ref_logp, 0.3), entropy_coef=0.02, clip=PPOClip(0.2, 0.25, 2.5))
    with use_backend(backend):
        loss, _ = ppo_loss_from_hidden(*leaves[:2], labels, old, adv, mask, bias=leaves[2], chunk_size=4, **kw)
    grads = torch.autograd.grad(loss * 0.5, leaves)
    refs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_loss, _ = reference.ppo_loss_from_hidden(*refs[:2], labels, old, adv, mask, bias=refs[2], agg=PPOAgg(), **kw)
    ref_grads = torch.autograd.grad(ref_loss * 0.5, refs)
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_bf16_error_at_most_twice_pytorch_bf16(softcap):
    """flash-attention's rule: the error vs float64 is at most ~2x that of the plain PyTorch path in bf16."""
    batch = _batch(2, 9, 32, 211, dtype=torch.bfloat16)
    (loss, _, grads), (rl, _, rg) = _fused_and_ref(batch, clip=PPOClip(), agg="token-mean", softcap=softcap)
    hidden, weight, labels, old, adv, mask, ref_logp = batch
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    torch_loss, _ = reference.ppo_loss_from_hidden(h, w, labels, old, adv, mask, kl=KLTerm(ref_logp, 0.1),
                                                   entropy_coef=0.01, clip=PPOClip(), agg=PPOAgg(), temperature=0.9,
                                                   softcap=softcap)
    torch_grads = torch.autograd.grad(torch_loss * 1.7, (h, w))
    err = lambda a, b: float((a.double() - b.double()).abs().max())  # noqa: E731
    assert err(loss, rl) <= 2 * err(torch_loss, rl) + 1e-3
    for g, tg, r in zip(grads, torch_grads, rg):
        assert err(g, r) <= 2 * err(tg, r) + 1e-3


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_equals_separate_public_ops(softcap):
    """The fused step == linear_token_logprobs + ppo_policy_loss + kl_penalty (+ the shared aggregation)."""
    hidden, weight, labels, old, adv, mask, ref_logp = _batch(4, 17, 24, 333)
    clip = PPOClip(0.2, 0.3, 3.0)
    agg = PPOAgg("token-mean", num_tokens=50)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_hidden(h, w, labels, old, adv, mask, kl=KLTerm(ref_logp, 0.2, "k2"),
                                       entropy_coef=0.03, clip=clip, agg=agg, softcap=softcap)
    fused_grads = torch.autograd.grad(loss, (h, w))
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, ent = linear_token_logprobs(h2, w2, torch.where(mask, labels, -100), return_entropy=True, softcap=softcap)
    pg, pstats = ppo_policy_loss(logp, old, adv, mask, clip=clip, agg=agg)
    kl = agg.aggregate(kl_penalty(logp, ref_logp, "k2"), mask)
    entropy = agg.aggregate(ent, mask)
    composed = pg + 0.2 * kl - 0.03 * entropy
    composed_grads = torch.autograd.grad(composed, (h2, w2))
    torch.testing.assert_close(loss, composed, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, composed_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.clip_frac, pstats.clip_frac)
    torch.testing.assert_close(stats.approx_kl, pstats.approx_kl, atol=1e-6, rtol=1e-5)


def test_hand_computed():
    """V = 2, p = (2/3, 1/3): logp(label 0) = log(2/3). With old_logp = logp - 1 the ratio is e, clipped to 1.2:
    loss = -1.2 * A for A = 1 (gradient 0); for A = -1 the unclipped branch -A r = e wins (gradient -A r = e)."""
    hidden = torch.ones(1, 2, 1, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[math.log(2.0)], [0.0]], dtype=torch.float64)
    labels = torch.zeros(1, 2, dtype=torch.long)
    old = torch.full((1, 2), math.log(2 / 3) - 1.0, dtype=torch.float64)
    mask = torch.tensor([[1, 0]])
    loss, stats = ppo_loss_from_hidden(hidden, weight, labels, old, torch.ones(1, 2, dtype=torch.float64), mask)
    assert loss.item() == pytest.approx(-1.2, abs=1e-12)
    assert stats.clip_frac.item() == 1.0 and stats.ratio_max.item() == pytest.approx(math.e)
    (g,) = torch.autograd.grad(loss, hidden)
    assert torch.equal(g, torch.zeros_like(g))
    loss, _ = ppo_loss_from_hidden(hidden, weight, labels, old, -torch.ones(1, 2, dtype=torch.float64), mask)
    assert loss.item() == pytest.approx(math.e, abs=1e-12)
    (g,) = torch.autograd.grad(loss, hidden)  # d/dh [r] = r * dlogp/dh = e * (log 2 - E_p[w]) = e * log2 / 3
    assert g[0, 0, 0].item() == pytest.approx(math.e * math.log(2.0) / 3, abs=1e-12) and g[0, 1, 0] == 0


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_fully_masked_and_nonfinite(backend):
    hidden, weight, labels, old, adv, mask, ref_logp = _batch(2, 5, 8, 19)
    h = hidden.clone().requires_grad_(True)
    with use_backend(backend):
        loss, stats = ppo_loss_from_hidden(h, weight, labels, old, adv, torch.zeros_like(mask),
                                           kl=KLTerm(ref_logp, 0.1), agg="seq-mean-token-mean")
        assert loss.item() == 0 and stats.ratio_mean.item() == 1 and stats.nonfinite.item() == 0
        (g,) = torch.autograd.grad(loss, h)
        assert torch.equal(g, torch.zeros_like(g))
        bad_adv = adv.clone()
        bad_adv[mask] = torch.where(torch.arange(int(mask.sum())) % 3 == 0, float("nan"), bad_adv[mask])
        bad_ref = ref_logp.clone()
        bad_ref[~mask] = float("inf")  # masked positions may hold anything
        loss, stats = ppo_loss_from_hidden(h, weight, labels, old, bad_adv, mask, kl=KLTerm(bad_ref, 0.1))
    keep = mask & torch.isfinite(bad_adv)
    ref_loss, _ = reference.ppo_loss_from_hidden(hidden.double(), weight.double(), labels, old.double(),
                                                 adv.double(), keep, kl=KLTerm(ref_logp.double(), 0.1),
                                                 clip=PPOClip(), agg=PPOAgg())
    assert torch.isfinite(loss) and stats.nonfinite.item() == int((mask & ~keep).sum()) > 0
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)


def test_chunk_size_does_not_change_the_result_much():
    batch = _batch(3, 30, 16, 100)
    a = _fused_and_ref(batch, clip=PPOClip(), agg="token-sum", chunk_size=1)[0][0]
    b = _fused_and_ref(batch, clip=PPOClip(), agg="token-sum", chunk_size=1000)[0][0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_input():
    hidden, weight, labels, old, adv, mask, ref_logp = _batch(2, 5, 8, 19)
    args = (hidden, weight, labels, old, adv, mask)
    with pytest.raises(ValueError, match="old_logp must have shape"):
        ppo_loss_from_hidden(hidden, weight, labels, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask.float() * 2)
    with pytest.raises(ValueError, match="labels must be in"):
        ppo_loss_from_hidden(hidden, weight, torch.where(mask, 19, 0), old, adv, mask)
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        ppo_loss_from_hidden(hidden[0], weight, labels, old, adv, mask)
    with pytest.raises(ValueError, match="weight must have shape"):
        ppo_loss_from_hidden(hidden, weight[:, :3], labels, old, adv, mask)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        ppo_loss_from_hidden(hidden, weight.double(), labels, old, adv, mask)
    with pytest.raises(ValueError, match="KLTerm.kind must be one of"):
        ppo_loss_from_hidden(*args, kl=KLTerm(ref_logp, 0.1, "k4"))
    with pytest.raises(TypeError, match="kl must be a KLTerm"):
        ppo_loss_from_hidden(*args, kl=ref_logp)
    with pytest.raises(ValueError, match=r"kl.ref_logp must have shape \(2, 5\)"):
        ppo_loss_from_hidden(*args, kl=KLTerm(ref_logp[:, :3], 0.1))
    with pytest.raises(ValueError, match="PPOAgg.mode"):
        ppo_loss_from_hidden(*args, agg="mean")
    with pytest.raises(TypeError, match="clip must be a PPOClip"):
        ppo_loss_from_hidden(*args, clip=0.2)
    with pytest.raises(ValueError, match="PPOClip.dual"):
        PPOClip(dual=0.5)
    with pytest.raises(ValueError, match="PPOClip.low"):
        PPOClip(low=1.5)
    with pytest.raises(ValueError, match="num_tokens"):
        PPOAgg("token-mean", num_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        ppo_loss_from_hidden(*args, temperature=0)
    with pytest.raises(ValueError, match=r"bias must be \(19,\)"):
        ppo_loss_from_hidden(*args, bias=torch.zeros(18))
    with pytest.raises(ValueError, match="advantages is on meta but hidden is on cpu"):
        ppo_loss_from_hidden(hidden, weight, labels, old, adv.to("meta"), mask)
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        ppo_loss_from_hidden(*args, softcap=-1.0)


def test_second_backward_is_a_clear_error():
    hidden, weight, labels, old, adv, mask, _ = _batch(2, 5, 8, 19)
    h = hidden.requires_grad_(True)
    loss, _ = ppo_loss_from_hidden(h, weight, labels, old, adv, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()
