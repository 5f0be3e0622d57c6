"""RolloutEngine end to end on tiny random transformers models (fp32, CPU)."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from rlhf_fast import ops
from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs

VOCAB = 128


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        m = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256))
    return m.eval()


PROMPTS = [[1, 5, 7], [3] * 20, list(range(9, 26)), [100, 2, 44, 9, 60, 61, 62]]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logits_of(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "mistral"])
def test_greedy_matches_hf_generate(kind):
    model = tiny(kind)
    outs = RolloutEngine(model, block_size=4).generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))
    assert [o.prompt_index for o in outs] == list(range(len(PROMPTS)))
    for o in outs:
        ref = hf_greedy(model, PROMPTS[o.prompt_index], 12)
        if o.token_ids != ref:  # allowed only where HF's two best logits tie within 1e-6
            i = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
            top2 = logits_of(model, PROMPTS[o.prompt_index] + ref[:i])[-1].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-6, (kind, o.prompt_index, i)
        assert o.finish_reason == "length" and o.logprobs.dtype == torch.float32 and len(o.logprobs) == 12


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_zero_mismatch_with_teacher_forced(kind, deterministic):
    model = tiny(kind)
    params = SamplingParams(max_new_tokens=9, temperature=0.7, top_k=50, n=3, seed=3)
    eng = RolloutEngine(model, block_size=4, deterministic=deterministic, max_num_seqs=5)
    outs = eng.generate(PROMPTS, params)
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    # score in a different composition and order than generation: reversed, and one at a time
    rev = teacher_forced_logprobs(model, prompts[::-1], outs[::-1], temperature=0.7, top_k=50,
                                  deterministic=deterministic, block_size=4)[::-1]
    single = [eng.teacher_forced_logprobs([p], [o], temperature=0.7, top_k=50)[0]
              for p, o in zip(prompts[:3], outs[:3])]
    for o, r in zip(outs, rev):
        assert r.dtype == torch.float32 and r.shape == o.logprobs.shape
        if deterministic:
            assert torch.equal(o.logprobs, r)
        else:
            torch.testing.assert_close(o.logprobs, r, atol=1e-5, rtol=0)
    for o, s in zip(outs, single):
        if deterministic:
            assert torch.equal(o.logprobs, s)
        else:
            torch.testing.assert_close(o.logprobs, s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_logprobs_of_the_distribution_sampled_from(deterministic):
    """top_k 20, top_p 0.8: Completion.logprobs are the cut, renormalised distribution's; the trainer side (teacher
    forced, support recomputed from its logits, or the engine's thresholds replayed) gives the same values, bitwise
    in deterministic mode (the PPO ratio at unchanged weights is exactly 1); logprobs="full" keeps the old values."""
    model = tiny("llama")
    with torch.no_grad():  # a peaked policy, so that top-k / top-p cut real mass
        model.lm_head.weight.mul_(6.0)
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.8, n=2, seed=5)
    eng = RolloutEngine(model, block_size=4, deterministic=deterministic)
    outs = eng.generate(PROMPTS, SamplingParams(**kw))
    full = eng.generate(PROMPTS, SamplingParams(**kw, logprobs="full"))
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    assert [o.token_ids for o in outs] == [f.token_ids for f in full]  # same draws, only the returned values differ
    recompute = eng.teacher_forced_logprobs(prompts, outs, temperature=0.9, top_k=20, top_p=0.8)
    whole = eng.teacher_forced_logprobs(prompts, outs, temperature=0.9)
    cut_any = False
    for o, f, r, w in zip(outs, full, recompute, whole):
        assert o.support_threshold.shape == o.logprobs.shape and bool(torch.isfinite(o.support_threshold).all())
        if deterministic:
            assert torch.equal(o.logprobs, r) and torch.equal(f.logprobs, w)
        else:
            torch.testing.assert_close(o.logprobs, r, atol=1e-5, rtol=0)
            torch.testing.assert_close(f.logprobs, w, atol=1e-5, rtol=0)
        assert bool((o.logprobs >= f.logprobs - 1e-6).all())  # renormalised over fewer tokens: never lower
        cut_any |= bool((o.logprobs > f.logprobs + 1e-3).any())
        # replay: the recorded thresholds on the teacher-forced logits give the same log-probs
        toks = PROMPTS[o.prompt_index] + o.token_ids
        logits = logits_of(model, toks)[len(PROMPTS[o.prompt_index]) - 1:-1]
        replay = ops.token_logprobs(logits, torch.tensor(o.token_ids), temperature=0.9, top_k=20, top_p=0.8,
                                    support="replay", support_threshold=o.support_threshold)
        torch.testing.assert_close(replay, o.logprobs, atol=1e-5, rtol=0)
    assert cut_any


def test_logprobs_are_log_softmax_at_sampled_token():
    model = tiny("llama")
    outs = RolloutEngine(model).generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, temperature=0.5, seed=0))
    for o in outs:
        toks = PROMPTS[o.prompt_index] + o.token_ids
        logits = logits_of(model, toks)[len(PROMPTS[o.prompt_index]) - 1:-1].double() / 0.5
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(o.logprobs.double(), ref, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = tiny("qwen2")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=11)
    eng = RolloutEngine(model, deterministic=True)
    a = eng.generate(PROMPTS, params)
    b = eng.generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    alone = eng.generate(PROMPTS[:1], params)  # prompt 0 sampled in a smaller batch: same draws
    assert [o.token_ids for o in alone] == [o.token_ids for o in a[:2]]
    other = eng.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=12))
    assert [o.token_ids for o in other] != [o.token_ids for o in a]


def test_stop_tokens_end_generation():
    model = tiny("llama")
    free = RolloutEngine(model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, temperature=0))[0]
    stop = free.token_ids[3]
    out = RolloutEngine(model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, temperature=0,
                                                                    stop_token_ids=(stop,)))[0]
    first = free.token_ids.index(stop)
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"


def test_preemption_and_resumption_give_same_tokens():
    model = tiny("llama")
    params = SamplingParams(max_new_tokens=20, temperature=0.9, n=2, seed=5)
    roomy = RolloutEngine(model, block_size=4, deterministic=True)
    tight = RolloutEngine(model, block_size=4, num_blocks=12, deterministic=True)
    a, b = roomy.generate(PROMPTS, params), tight.generate(PROMPTS, params)
    assert tight.stats.preemptions > 0 and roomy.stats.preemptions == 0
    assert tight.stats.peak_blocks_used <= 12
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert torch.equal(x.logprobs, y.logprobs)


def test_weights_are_bound_not_copied():
    model = tiny("llama")
    eng = RolloutEngine(model)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    before = eng.generate(PROMPTS[:2], params)
    with torch.no_grad():  # what an optimizer step does: update the HF parameters in place
        model.lm_head.weight.mul_(-1.0)
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    after = eng.generate(PROMPTS[:2], params)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert [o.token_ids for o in after] == [hf_greedy(model, p, 6) for p in PROMPTS[:2]]


def test_kv_waste_at_most_block_size_minus_one_per_sequence():
    model = tiny("gpt2")
    eng = RolloutEngine(model, block_size=8)
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0))
    held = sum(len(p) + 5 - 1 for p in PROMPTS)  # every token's K/V except the last sampled one
    assert held <= eng.stats.peak_blocks_used * 8 <= held + len(PROMPTS) * 7


def test_bad_input():
    model = tiny("llama")
    eng = RolloutEngine(model)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[1, 2], []])
    with pytest.raises(ValueError, match="context"):
        eng.generate([[1] * 300])
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([[1, VOCAB]])
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([[-1, 3]])
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="KV blocks"):
        RolloutEngine(model, block_size=4, num_blocks=2).generate([[1] * 10], SamplingParams(max_new_tokens=4))
    from rlhf_fast.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="unsupported model class"):
        RolloutEngine(torch.nn.Linear(2, 2))


def kept_set_fp64(logits, top_k, top_p):
    """Independent definition: the top_k most likely, then the shortest sorted prefix with mass >= top_p."""
    keep = []
    for row in logits.double():
        order = row.argsort(descending=True).tolist()
        if top_k:
            order = order[:top_k]
        p = torch.softmax(row[order], -1)
        cut = next((i + 1 for i in range(len(order)) if float(p[:i + 1].sum()) >= top_p), len(order))
        keep.append(set(order[:cut]))
    return keep


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (12, 0.8), (1, 0.3), (0, 1.0)])
def test_top_k_top_p_never_leave_the_kept_set(top_k, top_p):
    from rlhf_fast.rollout.philox import seed_key
    from rlhf_fast.rollout.sampling import keep_mask, sample

    logits = torch.randn(6, 50) * 3
    keep = kept_set_fp64(logits, top_k, top_p)
    mask = keep_mask(logits, top_k, top_p)
    assert [set(torch.nonzero(m).flatten().tolist()) for m in mask] == keep
    params, key, streams = SamplingParams(top_k=top_k, top_p=top_p), seed_key(0, "cpu"), torch.arange(6)
    seen = [set() for _ in range(6)]
    for pos in range(300):
        for b, t in enumerate(sample(logits, params, key, streams, torch.full((6,), pos)).tokens.tolist()):
            assert t in keep[b]
            seen[b].add(t)
    if top_k == 0 and top_p == 1.0:  # plain sampling reaches beyond the most likely tokens
        assert all(len(s) > 5 for s in seen)


def test_sampling_follows_the_distribution():
    from rlhf_fast.rollout.philox import seed_key
    from rlhf_fast.rollout.sampling import sample

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    draw = sample(logits.expand(4000, 4), SamplingParams(temperature=0.7), seed_key(0, "cpu"), torch.arange(4000),
                  torch.zeros(4000, dtype=torch.int64))
    counts = torch.bincount(draw.tokens, minlength=4)
    expect = torch.softmax(logits[0] / 0.7, -1) * 4000
    assert ((counts - expect).abs() < 5 * expect.sqrt() + 5).all(), (counts, expect)


def test_teacher_forced_bad_input():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="completions\\[1\\] is empty"):
        teacher_forced_logprobs(model, PROMPTS[:2], [[1], []])
    with pytest.raises(ValueError, match="same length"):
        teacher_forced_logprobs(model, PROMPTS[:2], [[1]])
    with pytest.raises(ValueError, match="temperature"):
        teacher_forced_logprobs(model, PROMPTS[:1], [[1]], temperature=0.0)


@pytest.mark.parametrize("act", ["silu", "gelu_new"])
def test_elementwise_is_batch_invariant(act):
    """PyTorch's CPU activations compute the tail of their vectorised loop with scalar code (an ulp apart);
    `elementwise` in deterministic mode gives every element the same path, so a row's result does not depend on
    how many rows share the call (plain `silu` fails this on x (301, 7) and (5000, 7): rows differ)."""
    from transformers.activations import ACT2FN

    from rlhf_fast.models.layers import elementwise

    fn = ACT2FN[act]
    for rows in (301, 5000):  # 5000 x 7 padded is over one call's GRAIN: several calls
        x = torch.randn(rows, 7)
        full = elementwise(fn, x, True)
        alone = torch.cat([elementwise(fn, x[i:i + 1], True) for i in range(0, rows, 13)])
        assert torch.equal(full[::13], alone)
        torch.testing.assert_close(full, fn(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_deterministic_bitwise_with_odd_widths(kind):
    """Widths that are not a multiple of the SIMD width (intermediate 100, vocab 253) put rows in the vector tail of
    elementwise kernels at some batch sizes and not others; deterministic mode must stay bitwise equal anyway."""
    torch.manual_seed(1)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=253,
                                             max_position_embeddings=128)).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=253, n_positions=128)).eval()
    prompts = [[(7 * i + j) % 253 for j in range(3 + 2 * i)] for i in range(7)]
    eng = RolloutEngine(model, block_size=4, deterministic=True)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=5))
    ps = [prompts[o.prompt_index] for o in outs]
    batch = eng.teacher_forced_logprobs(ps[::-1], outs[::-1])[::-1]
    for o, b, p in zip(outs, batch, ps):
        assert torch.equal(o.logprobs, b)
        assert torch.equal(o.logprobs, eng.teacher_forced_logprobs([p], [o])[0])


def test_torch_sampling_path_matches_native(monkeypatch):
    """The sampler's PyTorch path (CUDA, or a build without `_C`) draws the same tokens as the native one."""
    from rlhf_fast.rollout import sampling

    logits = torch.randn(5, 37) * 2
    thr = ops.support_threshold(logits, temperature=0.8, top_k=7, top_p=0.9)
    u = torch.rand(5, generator=torch.Generator().manual_seed(0))
    native = sampling.inverse_cdf(logits, 0.8, u, thr)
    monkeypatch.setattr(sampling._native, "has", lambda name: False)
    plain = sampling.inverse_cdf(logits, 0.8, u, thr)
    assert torch.equal(native, plain)
