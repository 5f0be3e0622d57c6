"""token_rewards: the InstructGPT per-token reward vs the reference and by hand, padding sides, bad input."""
import pytest
import torch
from _ppo_common import padded_mask, random_mask

from rlhf_fast.ops import reference, token_rewards


def test_hand_computed():
    # kl_coef 0.1, k1, log ratios (1, 2, -1): rewards (-0.1, -0.2, 0.1) and the score 5 on the last valid token.
    logp = torch.tensor([[1.0, 2.0, -1.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    r = token_rewards(torch.tensor([5.0], dtype=torch.float64), logp, torch.zeros_like(logp), mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.1, -0.2, 5.1, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("kind", ("k1", "k2", "k3", "abs"))
@pytest.mark.parametrize("left", (False, True))
def test_matches_reference_with_padding_and_holes(kind, left):
    b, t = 5, 23
    mask = padded_mask([23, 0, 1, 9, 17], t, left=left, device="cpu") & random_mask(b, t, p=0.85, device="cpu")
    logp, ref_logp = -torch.rand(b, t, dtype=torch.float64), -torch.rand(b, t, dtype=torch.float64)
    scores = torch.randn(b, dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    got = token_rewards(scores, x, ref_logp, mask, kl_coef=0.05, kind=kind)
    x64 = logp.clone().requires_grad_(True)
    want = reference.token_rewards(scores, x64, ref_logp, mask, kl_coef=0.05, kind=kind)
    torch.testing.assert_close(got, want)
    g = torch.randn(b, t, dtype=torch.float64)
    (dx,), (dx64,) = torch.autograd.grad((got * g).sum(), x), torch.autograd.grad((want * g).sum(), x64)
    torch.testing.assert_close(dx, dx64)
    # The score sits exactly on the last valid token of each non-empty row; the sum is score - kl_coef * sum(kl).
    assert (got[~mask] == 0).all()
    kl = reference.kl_penalty(logp, ref_logp, kind)
    want_sum = torch.where(mask.any(-1), scores, 0) - 0.05 * torch.where(mask, kl, 0).sum(-1)
    torch.testing.assert_close(got.detach().sum(-1), want_sum)


def test_no_tokens():
    r = token_rewards(torch.ones(3), torch.zeros(3, 0), torch.zeros(3, 0), torch.ones(3, 0), kl_coef=0.1)
    assert r.shape == (3, 0)


def test_bad_input():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"scores must have shape \(2,\)"):
        token_rewards(torch.zeros(3), lp, lp, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be a real number >= 0"):
        token_rewards(torch.zeros(2), lp, lp, m, kl_coef=-1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        token_rewards(torch.zeros(2), lp, lp, m, kl_coef=0.1, kind="k5")
    with pytest.raises(ValueError, match="mask must have the same shape"):
        token_rewards(torch.zeros(2), lp, lp, m[:, :2], kl_coef=0.1)
    with pytest.raises(ValueError, match="scores must be 1-D"):
        token_rewards(torch.zeros(2, 1), lp, lp, m, kl_coef=0.1)
