"""GPU: the GRPO-family specialisations of the Triton policy-loss kernels (importance weights, the sequence-level
ratio passed as a given log ratio, (batch,) advantages, the constant normaliser) and the fused step's sequence
pass, against float64, at the CPU tests' shapes and at a real one."""
import pytest
import torch
from _gpu import DEVICE, cuda_only, dry_subset, first_in_dry_run
from conftest import tol

from rlhf_fast.ops import KLTerm, PPOAgg, PPOClip, ppo_loss_from_hidden, ppo_policy_loss, reference, use_backend

pytestmark = pytest.mark.gpu
SPECS = [(PPOClip(3e-4, 4e-4, level="sequence"), PPOAgg("seq-mean-token-mean")),
         (PPOClip(0.2, 0.28, 3.0), PPOAgg("seq-mean-token-sum-norm", norm=4096.0)),
         (PPOClip(0.1, 0.3, level="sequence"), PPOAgg("token-mean"))]
SHAPES = first_in_dry_run((5, 41), (2, 1100), pytest.param((256, 8192), marks=cuda_only))
DTYPES = first_in_dry_run(torch.float32, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_loss_with_weights_and_sequence_ratio_matches_fp64(shape, dtype):
    b, t = shape
    logp = (-3 * torch.rand(b, t, device=DEVICE)).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(b, t, device=DEVICE)).to(dtype)
    adv = torch.randn(b, device=DEVICE).to(dtype)
    isw = (0.25 + 1.5 * torch.rand(b, t, device=DEVICE)).to(dtype)
    mask = torch.rand(b, t, device=DEVICE) < 0.8
    mask[min(1, b - 1)] = False
    t_ = tol(torch.float32)
    for clip, agg in dry_subset(SPECS):
        x = logp.clone().requires_grad_(True)
        with use_backend("triton"):
            loss, st = ppo_policy_loss(x, old, adv, mask, clip=clip, agg=agg, is_weights=isw)
        x64 = logp.double().requires_grad_(True)
        rl, rs = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, clip=clip, agg=agg,
                                           is_weights=isw.double())
        torch.testing.assert_close(loss.double(), rl.detach(), **t_)
        g, rg = torch.autograd.grad(loss, x)[0], torch.autograd.grad(rl, x64)[0]
        torch.testing.assert_close(g.double(), rg, **(tol(dtype) if dtype != torch.float32 else t_))
        for name in rs:
            torch.testing.assert_close(getattr(st, name).double(), rs[name].double(), **t_, msg=name)


@pytest.mark.parametrize("size", first_in_dry_run((3, 7, 16, 40), pytest.param((8, 256, 512, 4096),
                                                                                 marks=cuda_only)))
def test_fused_sequence_level_with_weights_matches_fp64(size):
    b, t, width, vocab = size
    hidden = torch.randn(b, t, width, device=DEVICE)
    weight = torch.randn(vocab, width, device=DEVICE) / width**0.5
    labels = torch.randint(0, vocab, (b, t), device=DEVICE)
    mask = torch.rand(b, t, device=DEVICE) > 0.2
    old = torch.randn(b, t, device=DEVICE) * 0.1 - torch.log(torch.tensor(float(vocab)))
    adv, isw = torch.randn(b, device=DEVICE), 0.5 + torch.rand(b, t, device=DEVICE)
    ref_logp = old + 0.05 * torch.randn(b, t, device=DEVICE)
    kw = dict(clip=PPOClip(0.2, 0.28, level="sequence"), agg="seq-mean-token-mean", entropy_coef=0.01)
    h = hidden.clone().requires_grad_(True)
    with use_backend("triton"):
        loss, _ = ppo_loss_from_hidden(h, weight, labels, old, adv, mask, kl=KLTerm(ref_logp, 0.05), is_weights=isw,
                                       **kw)
    (g,) = torch.autograd.grad(loss, h)
    h64 = hidden.double().requires_grad_(True)
    rl, _ = reference.ppo_loss_from_hidden(h64, weight.double(), labels, old.double(), adv.double(), mask,
                                           kl=KLTerm(ref_logp.double(), 0.05), is_weights=isw.double(), **kw)
    (rg,) = torch.autograd.grad(rl, h64)
    torch.testing.assert_close(loss.double(), rl.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-3)
