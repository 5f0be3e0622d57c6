"""ppo_loss_from_hidden's additive options, on every backend against float64: `token_stats=True` returns the
per-token log-probs and entropies the loss used (== the float64 `reference.linear_token_logprobs`, also truncated by
top-k / top-p), and `old_logp=None` is the on-policy step (== old_logp set to this step's own float64 log-probs: ratio
1, the same loss and gradients at every clip level), with no effect on the loss when either is off."""
import math

import pytest
import torch
from _backends import DEVICE, NATIVE_LOGPROBS, TRITON

from rlhf_fast.ops import KLTerm, PPOAgg, PPOClip, ppo_loss_from_hidden, reference, use_backend

BACKENDS = ["torch", NATIVE_LOGPROBS, TRITON]


def _batch(b, t, width, vocab, device):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(b, t, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) / width**0.5 * 2
    labels = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0] = False  # an empty row
    mask[1, :2] = True
    adv = torch.randn(b, generator=g)
    ref_logp = torch.randn(b, t, generator=g) * 0.3 - math.log(vocab)
    labels[~mask] = -100
    hidden[~mask] = float("nan")  # never read off the mask
    return [x.to(device) for x in (hidden, weight, labels, mask, adv, ref_logp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut", [(0, 1.0), (5, 0.8)])
def test_token_stats_match_fp64_logprobs(backend, cut):
    small = backend == "triton"
    dev = DEVICE if small else "cpu"
    hidden, weight, labels, mask, adv, ref_logp = _batch(3, 9, 16, 40 if small else 301, dev)
    old = torch.where(mask, ref_logp + 0.05, torch.full_like(ref_logp, float("nan")))
    kw = dict(clip=PPOClip(0.2, 0.28), agg="seq-mean-token-mean", kl=KLTerm(ref_logp, 0.1, "k3"), temperature=0.9,
              top_k=cut[0], top_p=cut[1], chunk_size=4)
    with use_backend(backend):
        h = hidden.clone().requires_grad_(True)
        loss, st = ppo_loss_from_hidden(h, weight, labels.clamp(min=0), old, adv, mask, token_stats=True, **kw)
        (gh,) = torch.autograd.grad(loss, h)
        h0 = hidden.clone().requires_grad_(True)
        loss0, st0 = ppo_loss_from_hidden(h0, weight, labels.clamp(min=0), old, adv, mask, **kw)
        (gh0,) = torch.autograd.grad(loss0, h0)
    assert st0.token_logp is None and st0.token_entropy is None  # off by default
    assert torch.equal(loss, loss0) and torch.equal(gh[mask], gh0[mask])  # the option changes nothing else
    want_lp, want_ent = reference.linear_token_logprobs(hidden.cpu().double(), weight.cpu().double(), labels.cpu(),
                                                        temperature=0.9, top_k=cut[0], top_p=cut[1],
                                                        return_entropy=True)
    m = mask.cpu()
    for got, want in ((st.token_logp, want_lp), (st.token_entropy, want_ent)):
        assert got.shape == mask.shape and got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got.cpu().double()[m], want[m], atol=2e-5, rtol=1e-5)
        assert torch.equal(got.cpu()[~m], torch.zeros_like(got.cpu()[~m]))  # 0 off the mask (no NaN)
    # the token means are the loss's entropy statistic (seq-mean-token-mean weights)
    w = PPOAgg("seq-mean-token-mean").token_weights(mask).cpu().double()
    torch.testing.assert_close((st.token_entropy.cpu().double() * w).sum(), st.entropy.cpu().double(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence", "sequence-sum"])
def test_on_policy_equals_own_fp64_logprobs(backend, level):
    small = backend == "triton"
    dev = DEVICE if small else "cpu"
    hidden, weight, labels, mask, adv, ref_logp = _batch(4, 8, 16, 40 if small else 257, dev)
    labels = labels.clamp(min=0)
    hidden = torch.where(mask[..., None], hidden, torch.zeros_like(hidden))
    clip = PPOClip(0.2, 0.28, 3.0, level=level)
    agg = "seq-mean-token-mean"
    kw = dict(clip=clip, agg=agg, kl=KLTerm(ref_logp, 0.05, "k3"), entropy_coef=0.01, temperature=0.7)
    with use_backend(backend):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, st = ppo_loss_from_hidden(h, w, labels, None, adv, mask, token_stats=True, **kw)
        grads = torch.autograd.grad(loss * 1.3, (h, w))
    # float64 composition with old = this step's own log-probs (detached): ratio exactly 1
    h64, w64 = hidden.cpu().double().requires_grad_(True), weight.cpu().double().requires_grad_(True)
    own = reference.linear_token_logprobs(h64.detach(), w64.detach(), torch.where(mask, labels, -100).cpu(),
                                          temperature=0.7)
    rl, rs = reference.ppo_loss_from_hidden(h64, w64, labels.cpu(), own, adv.cpu().double(), mask.cpu(),
                                            clip=clip, agg=PPOAgg.of(agg), entropy_coef=0.01, temperature=0.7,
                                            kl=KLTerm(ref_logp.cpu().double(), 0.05, "k3"))
    rg = torch.autograd.grad(rl * 1.3, (h64, w64))
    torch.testing.assert_close(loss.cpu().double(), rl.detach(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, rg):
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-5, rtol=1e-4)
    assert float(st.clip_frac) == 0.0 and float(st.approx_kl) == 0.0
    assert float(st.ratio_min) == 1.0 == float(st.ratio_max)  # exactly: the log ratio is 0, not a rounding of it
    torch.testing.assert_close(st.token_logp.cpu().double()[mask.cpu()], own[mask.cpu()], atol=2e-5, rtol=1e-5)


def test_on_policy_refuses_rollout_logp():
    hidden, weight, labels, mask, adv, ref_logp = _batch(2, 4, 8, 11, "cpu")
    with pytest.raises(ValueError, match="rollout_logp needs old_logp"):
        ppo_loss_from_hidden(hidden, weight, labels.clamp(min=0), None, adv, mask, rollout_logp=ref_logp)
