"""RolloutEngine(compile=True): the decode step compiled once per batch bucket gives the eager engine's tokens and
log-probs (bitwise in deterministic mode; through inductor in the default mode), and reuses its graphs."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_fast.rollout import RolloutEngine, SamplingParams
from rlhf_fast.rollout.decode_step import bucket


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                        max_position_embeddings=128)).eval()


def same(a, b, exact=True):
    assert [(o.prompt_index, o.token_ids, o.finish_reason) for o in a] == \
        [(o.prompt_index, o.token_ids, o.finish_reason) for o in b]
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x.logprobs, y.logprobs) and torch.equal(x.support_threshold, y.support_threshold)
        else:
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=0)
            torch.testing.assert_close(x.support_threshold, y.support_threshold, atol=1e-5, rtol=0)


def buckets_met(outs) -> set[int]:
    """The buckets of the decode steps of a request (one prefill, then every unfinished sequence decodes)."""
    sizes = {sum(len(o.token_ids) > t for o in outs) for t in range(1, max(len(o.token_ids) for o in outs))}
    return {bucket(n) for n in sizes - {0}}


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 31, 32, 33, 256)] == [1, 2, 4, 4, 8, 8, 16, 32, 32, 64, 256]


def test_deterministic_compiled_is_bitwise_eager_and_reuses_its_buckets():
    """Sequences stop at different steps (stop token, lengths), so the batch shrinks through 7 sizes; the compiled
    engine draws the eager engine's tokens with bitwise its log-probs, compiles once per bucket it meets, and a
    second request over other batch sizes in the same buckets compiles nothing."""
    model = tiny_llama()
    prompts = [[(3 * i + j) % 97 for j in range(2 + 2 * i)] for i in range(7)]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20, top_p=0.9, n=1, seed=5,
                            stop_token_ids=tuple(range(0, 97, 7)))
    eager = RolloutEngine(model, block_size=4, deterministic=True)
    comp = RolloutEngine(model, block_size=4, deterministic=True, compile=True)
    a, b = eager.generate(prompts, params), comp.generate(prompts, params)
    same(a, b)
    met = buckets_met(a)
    assert met == {1, 2, 4, 8}
    assert comp.stats.compilations == len(met) and comp.stats.compile_seconds > 0
    params2 = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20, top_p=0.9, n=1, seed=7,
                             stop_token_ids=tuple(range(0, 97, 7)))  # an equal setting, another seed and prompts
    c = comp.generate(prompts[2:], params2)
    same(eager.generate(prompts[2:], params2), c)
    assert buckets_met(c) - met == set()  # batch sizes of their own, in the buckets already compiled
    assert comp.stats.compilations == 0 and comp.stats.compile_seconds == 0
    greedy = SamplingParams(max_new_tokens=6, temperature=0)  # another sampler: its own graphs
    same(eager.generate(prompts[:4], greedy), comp.generate(prompts[:4], greedy))


def test_default_mode_compiled_through_inductor_matches_eager():
    """Inductor (the default mode's backend) computes the step's elementwise work in its own kernels: the tokens are
    the eager engine's and the log-probs agree to float rounding; three batches in one bucket compile once."""
    model = tiny_llama()
    prompts = [[(7 * i + j) % 97 for j in range(5 + i)] for i in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=30, seed=2)
    eager = RolloutEngine(model, block_size=8)
    comp = RolloutEngine(model, block_size=8, compile=True)
    same(eager.generate(prompts, params), comp.generate(prompts, params), exact=False)
    assert comp.stats.compilations == 1  # 4 rows throughout: bucket 4
    same(eager.generate(prompts[:3], params), comp.generate(prompts[:3], params), exact=False)  # 3 rows: bucket 4
    assert comp.stats.compilations == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_graph_decode_matches_eager(deterministic):
    """On CUDA the compiled step (captured as a CUDA graph per bucket and replayed in the default mode) gives the
    eager engine's tokens, and its log-probs (bitwise in deterministic mode)."""
    model = tiny_llama().cuda()
    prompts = [[(3 * i + j) % 97 for j in range(2 + 2 * i)] for i in range(7)]
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, n=2, seed=4,
                            stop_token_ids=(5, 17))
    eager = RolloutEngine(model, block_size=16, deterministic=deterministic, kv_cache_memory=64 << 20)
    comp = RolloutEngine(model, block_size=16, deterministic=deterministic, kv_cache_memory=64 << 20, compile=True)
    same(eager.generate(prompts, params), comp.generate(prompts, params), exact=deterministic)
    same(eager.generate(prompts[1:], params), comp.generate(prompts[1:], params), exact=deterministic)
    assert comp.stats.compilations == 0
