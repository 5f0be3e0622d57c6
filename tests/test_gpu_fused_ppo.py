"""GPU: the fused PPO step (`ppo_loss_from_hidden` on the Triton row kernels) against the float64 composition,
at the CPU tests' shapes and at a real one (hidden 4096, vocab 151936, bf16), loss, stats and both gradients."""
import math

import pytest
import torch
from _gpu import DEVICE, assert_within_twice_torch, cuda_only, dry_subset, first_in_dry_run

from rlhf_fast.ops import KLTerm, PPOAgg, PPOClip, ppo_loss_from_hidden, reference, use_backend

pytestmark = pytest.mark.gpu
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")
KL_COEF, KW = 0.1, dict(entropy_coef=0.01, temperature=0.9)
REAL_WIDTH, REAL_VOCAB = 4096, 151936


def _batch(b, t, width, vocab, dtype):
    hidden = torch.randn(b, t, width, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, width, device=DEVICE) / width**0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, (b, t), device=DEVICE)
    mask = torch.rand(b, t, device=DEVICE) > 0.3
    mask[0] = False  # an empty row
    old = torch.randn(b, t, device=DEVICE) * 0.3 - math.log(vocab)
    adv = torch.randn(b, t, device=DEVICE)
    ref_logp = torch.randn(b, t, device=DEVICE) * 0.3 - math.log(vocab)
    return hidden, weight, labels, old, adv, mask, ref_logp


def _step(batch, *, clip, agg, backend=None, fp64=False, kl_kind="k3", **kw):
    """(loss, stats, dhidden, dweight) of one fused step; fp64: the float64 reference composition."""
    hidden, weight, labels, old, adv, mask, ref_logp = batch
    cast = (lambda x: x.double()) if fp64 else (lambda x: x)
    h, w = cast(hidden).requires_grad_(True), cast(weight).requires_grad_(True)
    if fp64:
        loss, stats = reference.ppo_loss_from_hidden(h, w, labels, old.double(), adv.double(), mask, clip=clip,
                                                     agg=PPOAgg(agg), kl=KLTerm(ref_logp.double(), KL_COEF, kl_kind),
                                                     **KW, **kw)
        stats = dict(stats)
    else:
        with use_backend(backend):
            loss, stats = ppo_loss_from_hidden(h, w, labels, old, adv, mask, clip=clip, agg=agg,
                                               kl=KLTerm(ref_logp, KL_COEF, kl_kind), **KW, **kw)
        stats = stats._asdict()
    dh, dw = torch.autograd.grad(loss * 1.7, (h, w))  # a non-unit upstream gradient
    return loss.detach(), stats, dh, dw


@pytest.mark.parametrize("agg", first_in_dry_run(*AGGS))
@pytest.mark.parametrize("dtype", first_in_dry_run(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", first_in_dry_run((3, 7, 16, 40), pytest.param((3, 23, 16, 301), marks=cuda_only),
                                                   pytest.param((4, 64, 128, 4231), marks=cuda_only)))
def test_fused_ppo_matches_fp64(shape, dtype, agg):
    batch = _batch(*shape, dtype)
    clip = PPOClip(0.2, 0.28, 3.0)
    loss, stats, dh, dw = _step(batch, clip=clip, agg=agg, backend="triton")
    ref_loss, ref_stats, ref_dh, ref_dw = _step(batch, clip=clip, agg=agg, fp64=True)
    t = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss.double(), ref_loss, **t)
    for name in dry_subset(ref_stats):
        if name in stats:
            torch.testing.assert_close(stats[name].double(), ref_stats[name].double(), **t, msg=name)
    g = dict(atol=t["atol"] * 4, rtol=t["rtol"] * 4)
    torch.testing.assert_close(dh.double(), ref_dh, **g)
    torch.testing.assert_close(dw.double(), ref_dw, **g)


@cuda_only
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("clip", [PPOClip(), PPOClip(0.1, 0.3), PPOClip(0.2, None, 2.0)])
def test_fused_ppo_kl_kinds_and_clips_match_fp64(kl_kind, clip):
    batch = _batch(3, 23, 16, 301, torch.float32)
    loss, _, dh, dw = _step(batch, clip=clip, agg="seq-mean-token-mean", backend="triton", kl_kind=kl_kind)
    ref_loss, _, ref_dh, ref_dw = _step(batch, clip=clip, agg="seq-mean-token-mean", fp64=True, kl_kind=kl_kind)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dh.double(), ref_dh, atol=8e-5, rtol=8e-5)
    torch.testing.assert_close(dw.double(), ref_dw, atol=8e-5, rtol=8e-5)


@cuda_only
def test_fused_ppo_real_size_bf16_within_twice_torch():
    """hidden 4096, vocab 151936, 2 x 96 tokens in bf16: loss and gradients within 2x the torch path's error."""
    batch = _batch(2, 96, REAL_WIDTH, REAL_VOCAB, torch.bfloat16)
    clip = PPOClip(0.2, 0.28)
    ref = _step(batch, clip=clip, agg="token-mean", fp64=True)
    kernel = _step(batch, clip=clip, agg="token-mean", backend="triton")
    plain = _step(batch, clip=clip, agg="token-mean", backend="torch")
    for i, name in ((0, "loss"), (2, "dhidden"), (3, "dweight")):
        assert_within_twice_torch(kernel[i], plain[i], ref[i], slack=1e-3, what=name)


@pytest.mark.parametrize("shape,dtype", [pytest.param((3, 7, 16, 40), torch.float32, id="tiny"),
                                         pytest.param((2, 96, REAL_WIDTH, REAL_VOCAB), torch.bfloat16,
                                                      marks=cuda_only, id="real")])
def test_fused_ppo_softcap_within_twice_torch(shape, dtype):
    """Gemma 2's final soft-cap (30) and top-k / top-p through the fused step: loss and gradients within 2x the
    torch path's error against float64."""
    batch = _batch(*shape, dtype)
    kw = dict(clip=PPOClip(0.2, 0.28), agg="token-mean", softcap=30.0, top_k=50, top_p=0.9)
    ref = _step(batch, fp64=True, **kw)
    kernel = _step(batch, backend="triton", **kw)
    plain = _step(batch, backend="torch", **kw)
    for i, name in ((0, "loss"), (2, "dhidden"), (3, "dweight")):
        assert_within_twice_torch(kernel[i], plain[i], ref[i], slack=1e-3, what=name)
