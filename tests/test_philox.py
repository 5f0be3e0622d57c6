"""The counter-based sampler: Philox4x32-10 against Random123's known answers, its uniforms, the token distribution it
samples, and a sequence's draws not depending on its batch."""
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_fast.rollout import RolloutEngine, SamplingParams
from rlhf_fast.rollout.philox import _mulhilo, philox4x32, seed_key, uniform
from rlhf_fast.rollout.sampling import keep_mask, sample

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ([0x00000000] * 4, [0x00000000] * 2, [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([0xffffffff] * 4, [0xffffffff] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),  # the digits of pi
]


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at the normal quantile z (3.09: p = 0.001), Wilson-Hilferty approximation."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_known_answers():
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    assert philox4x32(counter, key).tolist() == [out for _, _, out in KAT]
    for c, k, out in KAT:  # one at a time, and a key broadcast over rows
        assert philox4x32(torch.tensor(c), torch.tensor(k)).tolist() == out
        assert philox4x32(torch.tensor([c, c]), torch.tensor(k)).tolist() == [out, out]


def test_mulhilo_matches_integer_product():
    rnd = random.Random(0)
    b = [0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x80000000] + [rnd.getrandbits(32) for _ in range(2000)]
    for a in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 1):
        lo, hi = _mulhilo(a, torch.tensor(b))
        assert lo.tolist() == [(a * x) & 0xFFFFFFFF for x in b]
        assert hi.tolist() == [(a * x) >> 32 for x in b]


def test_uniforms_are_uniform():
    """2^17 draws over streams x positions, 64 bins: chi-square below its 0.001 quantile; values are multiples of
    2^-24 in [0, 1); another seed gives other draws."""
    streams, positions = torch.meshgrid(torch.arange(512), torch.arange(256), indexing="ij")
    u = uniform(seed_key(12345, "cpu"), streams.flatten(), positions.flatten())
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 2**24, (u * 2**24).floor())
    counts = torch.bincount((u * 64).long(), minlength=64)
    assert chi2(counts, torch.full((64,), u.numel() / 64, dtype=torch.float64)) < chi2_critical(63)
    # pairs of successive positions of a stream are independent: a 16 x 16 grid of (u_t, u_t+1)
    grid = (u.view(512, 256)[:, :-1] * 16).long() * 16 + (u.view(512, 256)[:, 1:] * 16).long()
    counts = torch.bincount(grid.flatten(), minlength=256)
    assert chi2(counts, torch.full((256,), grid.numel() / 256, dtype=torch.float64)) < chi2_critical(255)
    other = uniform(seed_key(12346, "cpu"), streams.flatten(), positions.flatten())
    assert float((other == u).float().mean()) < 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.8, 6, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 7, 0.9)])
def test_token_distribution_matches_the_cut_softmax(temperature, top_k, top_p):
    """40000 draws of one row (each its own stream): never outside top-k / top-p's kept set, and the counts match
    softmax(logits / T) renormalised over it (chi-square below its 0.001 quantile)."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 2
    n = 40000
    draw = sample(logits.expand(n, 12), SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                  seed_key(7, "cpu"), torch.arange(n), torch.full((n,), 5))
    keep = keep_mask(logits.double() / temperature, top_k, top_p)[0]
    p = torch.softmax((logits[0].double() / temperature).masked_fill(~keep, float("-inf")), -1)
    counts = torch.bincount(draw.tokens, minlength=12)
    assert int(counts[~keep].sum()) == 0
    kept = keep.nonzero().flatten()
    assert chi2(counts[kept], p[kept] * n) < chi2_critical(max(1, len(kept) - 1))
    # the returned log-probs are the cut distribution's
    torch.testing.assert_close(draw.logprobs.double(), p.log()[draw.tokens], atol=1e-5, rtol=0)


def test_a_row_draws_the_same_alone_or_in_any_batch():
    """The same (seed, stream, position) gives the same token in a batch of 1 or 7, at any row."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0)) * 3
    params, key = SamplingParams(temperature=0.9, top_k=20, top_p=0.9), seed_key(5, "cpu")
    streams, positions = torch.tensor([3, 11, 0, 7, 2, 40, 9]), torch.tensor([4, 4, 9, 0, 17, 3, 8])
    batch = sample(logits, params, key, streams, positions)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    shuffled = sample(logits[order], params, key, streams[order], positions[order])
    assert torch.equal(shuffled.tokens, batch.tokens[order])
    for i in range(7):
        alone = sample(logits[i:i + 1], params, key, streams[i:i + 1], positions[i:i + 1])
        assert int(alone.tokens) == int(batch.tokens[i])
        assert torch.equal(alone.logprobs, batch.logprobs[i:i + 1])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.8)])
def test_engine_sequence_alone_or_in_a_batch_of_seven(top_k, top_p):
    """A prompt's samples draw the same tokens (and, in deterministic mode, bitwise the same log-probs) whether it
    is generated alone or with six other prompts, and wherever its batch is split (`first_index`)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                         max_position_embeddings=128)).eval()
    prompts = [[(5 * i + j) % 97 for j in range(2 + 3 * i)] for i in range(7)]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=top_k, top_p=top_p, n=2, seed=21)
    eng = RolloutEngine(model, block_size=4, deterministic=True)
    batch = eng.generate(prompts, params)
    for i in (0, 3, 6):
        alone = eng.generate([prompts[i]], params, first_index=i)
        for a, b in zip(alone, batch[2 * i:2 * i + 2]):
            assert a.token_ids == b.token_ids
            assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.support_threshold, b.support_threshold)
    assert len({tuple(o.token_ids) for o in batch}) > 7  # the two samples of a prompt draw differently
