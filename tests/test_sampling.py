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


@pytest.mark.skipif(not _native.has("sample_fused_cpu"), reason="native extension without the fused sampler")
@pytest.mark.parametrize("temperature,top_k,top_p,logprobs", [(0.0, 0, 1.0, "sampled"), (1.0, 0, 1.0, "sampled"),
                                                               (0.7, 0, 1.0, "sampled"), (0.9, 20, 0.8, "sampled"),
                                                               (1.3, 0, 0.5, "full"), (1.0, 1, 1.0, "sampled")])
def test_fused_cpu_sampler_draws_as_the_torch_path(monkeypatch, temperature, top_k, top_p, logprobs):
    """`sample_fused_cpu` (Philox, temperature, cut, inverse CDF / argmax and log-prob in one native call) draws the
    tokens of the op-by-op path; exact=True gives `ops.token_logprobs`' values bitwise, exact=False within 1e-5."""
    from rlhf_fast.rollout import philox, sampling
    from rlhf_fast.rollout.types import SamplingParams

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 4099, generator=g) * 3
    logits[5, 7] = logits[5, 9] = logits[5].max() + 1  # a tie at the top: greedy takes the first
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, logprobs=logprobs)
    key = philox.seed_key(2**40 + 17, torch.device("cpu"))
    streams = torch.arange(37, dtype=torch.int64) * 2**31 + 5  # words above 2^32 too
    positions = torch.randint(0, 3000, (37,), generator=g)
    exact = sampling.sample(logits, params, key, streams, positions, exact=True)
    fast = sampling.sample(logits, params, key, streams, positions.int(), exact=False)
    has = _native.has
    monkeypatch.setattr(sampling._native, "has", lambda name: name != "sample_fused_cpu" and has(name))
    ref = sampling.sample(logits, params, key, streams, positions)
    assert torch.equal(exact.tokens, ref.tokens) and torch.equal(fast.tokens, ref.tokens)
    assert torch.equal(exact.logprobs, ref.logprobs)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(exact.thresholds, ref.thresholds) and torch.equal(fast.thresholds, ref.thresholds)
    if temperature == 0:
        assert int(exact.tokens[5]) == 7
        nan = logits.clone()
        nan[6, 100] = float("nan")  # torch.argmax's answer: the NaN
        assert int(sampling.sample(nan, params, key, streams, positions).tokens[6]) == 100
        monkeypatch.undo()
        assert int(sampling.sample(nan, params, key, streams, positions).tokens[6]) == 100
        assert int(sampling.sample(nan, params, key, streams, positions, exact=False).tokens[6]) == 100
