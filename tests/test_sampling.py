"""The native inverse-CDF sampler (csrc/sampling.cpp) against a float64 inverse CDF, and its kept-set guarantees."""
import pytest
import torch

from rlhf_fast import _native
from rlhf_fast.rollout.sampling import _sample_rows_native

pytestmark = pytest.mark.skipif(not _native.has("sample_rows_cpu"), reason="native extension not built")


def inverse_cdf_fp64(logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, gap): the float64 inverse CDF at u, and how far u * total lies from the nearest CDF step (relative)."""
    x = logits.double()
    cdf = (x - x.max(-1, keepdim=True).values).exp().cumsum(-1)  # (B, V)
    thr = u.double()[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, thr, right=True)[:, 0].clamp_max(x.shape[1] - 1)
    gap = ((cdf - thr).abs().min(-1).values / cdf[:, -1])
    return tokens, gap


@pytest.mark.parametrize("vocab", [1, 7, 255, 256, 257, 4231, 16384])
def test_matches_fp64_inverse_cdf(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(41, vocab, generator=g) * 4
    u = torch.rand(41, generator=g)
    tokens = _sample_rows_native(logits, u)
    ref, gap = inverse_cdf_fp64(logits, u)
    differ = tokens != ref
    assert (gap[differ] < 1e-5).all(), (tokens[differ], ref[differ], gap[differ])
    assert int(differ.sum()) <= 1


def test_extreme_uniforms_and_masked_tokens_never_drawn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g)
    keep = torch.rand(6, 1000, generator=g) < 0.05
    keep[:, 999] = False  # the last token is dropped: rounding at u ~ 1 must not fall through to it
    keep[0] = False
    keep[0, 0] = True  # a single kept token
    masked = logits.masked_fill(~keep, float("-inf"))
    for u0 in (0.0, 1e-9, 0.5, 1 - 2**-24):
        tokens = _sample_rows_native(masked, torch.full((6,), u0))
        assert keep.gather(1, tokens[:, None]).all(), (u0, tokens)
    first = keep.float().argmax(-1)
    assert torch.equal(_sample_rows_native(masked, torch.zeros(6)), first)
    last = 999 - keep.flip(-1).float().argmax(-1)
    assert torch.equal(_sample_rows_native(masked, torch.full((6,), 1 - 2**-24)), last)


def test_rows_are_batch_invariant_and_strided():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 3000, generator=g) * 3
    logits = wide[:, :2999]  # row stride 3000 > vocab 2999
    u = torch.rand(9, generator=g)
    full = _sample_rows_native(logits, u)
    for i in (0, 4, 8):
        assert int(_sample_rows_native(logits[i:i + 1].clone(), u[i:i + 1])[0]) == int(full[i])


def test_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, float("-inf")]]).expand(20000, 5).contiguous()
    u = torch.rand(20000, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(_sample_rows_native(logits, u), minlength=5)
    expect = torch.softmax(logits[0], -1) * 20000
    assert counts[4] == 0
    assert ((counts - expect).abs() < 5 * expect.sqrt() + 5).all(), (counts, expect)
