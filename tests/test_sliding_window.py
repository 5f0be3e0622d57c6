"""Sliding-window models (Mistral, Qwen2 with use_sliding_window) through the rollout engine, the teacher-forced
scorer and the packed training forward, against transformers' own forward and generate (fp32, CPU)."""
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_fast.models import from_hf
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs

VOCAB = 97
PROMPTS = [[1, 5, 7], list(range(9, 39)), [3] * 20, [60, 2, 44, 9, 61, 62, 63, 5, 6, 70, 71]]  # 3, 30, 20, 11 tokens


def mistral(window: int, **kw):
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=window,
                        **kw)
    return MistralForCausalLM(cfg).eval()


def qwen2_sliding(max_window_layers: int):
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, use_sliding_window=True,
                      sliding_window=8, max_window_layers=max_window_layers)
    return Qwen2ForCausalLM(cfg).eval()


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, prompt, tokens, temperature=1.0):
    """log-softmax(logits / T) of `tokens` after `prompt` from HF's full forward (fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def assert_greedy_matches(model, outs, prompts, n):
    for o in outs:
        ref = hf_greedy(model, prompts[o.prompt_index], n)
        if o.token_ids != ref:  # allowed only where HF's two best logits tie within 1e-6
            i = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
            with torch.no_grad():
                last = model(torch.tensor([prompts[o.prompt_index] + ref[:i]])).logits[0, -1]
            top2 = last.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-6, (o.prompt_index, i)


@pytest.mark.parametrize("window,block_size", [(16, 16), (8, 4), (5, 4)])
def test_greedy_matches_hf_generate_past_the_window(window, block_size):
    model = mistral(window)
    assert from_hf(model).max_context == 256 and from_hf(model).kv_window == window
    outs = RolloutEngine(model, block_size=block_size).generate(PROMPTS, SamplingParams(max_new_tokens=40,
                                                                                        temperature=0))
    assert all(len(o.token_ids) == 40 for o in outs)
    assert_greedy_matches(model, outs, PROMPTS, 40)


def test_window_is_not_the_context():
    """The issue's case: window 64, context 256, a 58-token prompt plus 16 new tokens is fine."""
    model = mistral(64)
    prompt = [(7 * i) % VOCAB for i in range(58)]
    outs = RolloutEngine(model).generate([prompt], SamplingParams(max_new_tokens=16, temperature=0))
    assert len(outs[0].token_ids) == 16
    assert_greedy_matches(model, outs, [prompt], 16)
    with pytest.raises(ValueError, match="context of 256"):
        RolloutEngine(model).generate([prompt * 4], SamplingParams(max_new_tokens=30))


@pytest.mark.parametrize("deterministic", [False, True])
def test_sampled_logprobs_match_hf_forward(deterministic):
    model = mistral(8)
    params = SamplingParams(max_new_tokens=30, temperature=0.8, n=2, seed=5)
    eng = RolloutEngine(model, block_size=4, deterministic=deterministic, max_num_seqs=5)
    outs = eng.generate(PROMPTS, params)
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    scored = teacher_forced_logprobs(model, prompts[::-1], outs[::-1], temperature=0.8,
                                     deterministic=deterministic, block_size=4)[::-1]
    for p, o, s in zip(prompts, outs, scored):
        ref = hf_logprobs(model, p, o.token_ids, 0.8)
        torch.testing.assert_close(o.logprobs, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
        if deterministic:
            assert torch.equal(o.logprobs, s)


def test_peak_blocks_bounded_by_the_window():
    """A long generation with a small window holds about window / block_size + 1 blocks per sequence, not its
    length; blocks shared by the samples of a prompt are freed once the last of them leaves the window."""
    model = mistral(8)
    params = SamplingParams(max_new_tokens=150, temperature=0, n=2)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
    eng = RolloutEngine(model, block_size=4, num_blocks=4 * 4)  # 4 sequences x (8 / 4 + 1) blocks + 1 to spare
    outs = eng.generate(prompts, params)
    assert eng.stats.preemptions == 0 and eng.stats.peak_blocks_used <= 4 * 3 + 1, eng.stats
    full = -(-(30 + 150) // 4)
    assert eng.stats.peak_blocks_used < full  # one unwindowed sequence alone would need more than the pool
    for o in outs:
        assert o.token_ids == hf_greedy(model, prompts[o.prompt_index], 150)


@pytest.mark.parametrize("deterministic", [False, True])
def test_preemption_with_window_gives_same_tokens(deterministic):
    model = mistral(8)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, n=2, seed=11)
    ref = RolloutEngine(model, block_size=4, deterministic=deterministic).generate(PROMPTS, params)
    # deterministic mode's prefill reads the cache: a recompute needs every block of the sequence
    tight = RolloutEngine(model, block_size=4, num_blocks=19 if deterministic else 9, deterministic=deterministic)
    outs = tight.generate(PROMPTS, params)
    assert tight.stats.preemptions > 0
    for a, b in zip(outs, ref):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_window_layers", [0, 1, 3])
def test_qwen2_sliding_layers_follow_max_window_layers(max_window_layers):
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide (transformers' layer_types); KV blocks
    are freed only when every layer slides."""
    model = qwen2_sliding(max_window_layers)
    lm = from_hf(model)
    assert lm.windows == [0 if i < max_window_layers else 8 for i in range(3)]
    assert lm.kv_window == (8 if max_window_layers == 0 else 0)
    outs = RolloutEngine(model, block_size=4).generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    assert_greedy_matches(model, outs, PROMPTS, 24)
    assert from_hf(Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                                   sliding_window=8, use_sliding_window=False))).windows == [0, 0]


def test_layer_windows_rules():
    from types import SimpleNamespace

    from rlhf_fast.models.llama import layer_windows

    def cfg(model_type, **kw):
        return SimpleNamespace(model_type=model_type, num_hidden_layers=4, **kw)

    assert layer_windows(cfg("llama", sliding_window=8)) == [0] * 4  # Llama has no window whatever the config says
    assert layer_windows(cfg("mistral", sliding_window=8, layer_types=["full_attention"] * 4)) == [8] * 4
    assert layer_windows(cfg("mistral", sliding_window=None)) == [0] * 4
    qwen = dict(sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert layer_windows(cfg("qwen2", **qwen, layer_types=None)) == [0, 0, 8, 8]  # a config without layer_types
    assert layer_windows(cfg("qwen2", **dict(qwen, use_sliding_window=False), layer_types=None)) == [0] * 4
    with pytest.raises(ValueError, match="chunked_attention"):
        layer_windows(cfg("qwen2", **qwen, layer_types=["chunked_attention"] * 4))


# --- the packed training forward ---

RESPONSES = [list(range(40, 61)), [20, 21, 22], list(range(70, 88)), [30] * 12, list(range(50, 62))]


def hf_sum_logprobs(model, prompts, responses):
    """HF forward of each prompt + response alone: the log-probs of the response tokens (list of (L,))."""
    out = []
    for p, r in zip(prompts, responses):
        logits = model(torch.tensor([p + r[:-1]])).logits[0, len(p) - 1:]
        out.append(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r)[:, None])[:, 0])
    return out


def packed_logprobs(model, batch, responses, deterministic=False):
    width = max(map(len, responses))
    h = packed_hidden(model, batch, deterministic=deterministic)
    logits = model.lm_head(h[batch.predict_index(width)])  # (N, width, V)
    lp = torch.log_softmax(logits.float(), -1)
    return [lp[i, :len(r)].gather(1, torch.tensor(r)[:, None])[:, 0] for i, r in enumerate(responses)]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["per-sample", "shared-unit", "shared-batched", "deterministic"])
@pytest.mark.parametrize("window", [8, 5])
def test_packed_forward_matches_hf(layout, window, monkeypatch):
    """Log-probs and every parameter's gradient of the padding-free forward vs HF's, with prompt + response well
    over the window, for every attention layout of `models.packed`."""
    from rlhf_fast.models import packed

    model = mistral(window)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[3], PROMPTS[3]]  # responses of 3 and 18; of 12 and 12
    groups = [0, 1, 1, 3, 3]
    share = layout != "per-sample"
    monkeypatch.setattr(packed, "BATCH_MIN_WORK", -(1 << 62) if layout == "shared-batched" else 1 << 62)
    ref = hf_sum_logprobs(model, prompts, RESPONSES)
    weights = [torch.randn(len(r), generator=torch.Generator().manual_seed(i)) for i, r in enumerate(RESPONSES)]
    g_ref = grads(model, sum((lp * w).sum() for lp, w in zip(ref, weights)))
    batch = pack(prompts, RESPONSES, groups=groups, share_prompts=share)
    lps = packed_logprobs(model, batch, RESPONSES, deterministic=layout == "deterministic")
    for a, b in zip(lps, ref):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)
    g = grads(model, sum((lp * w).sum() for lp, w in zip(lps, weights)))
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], atol=2e-5, rtol=1e-4, msg=n)


def test_packed_reads_rows_equal_full_forward_with_window():
    model = mistral(6)
    batch = pack([PROMPTS[1]] * 2, RESPONSES[:2], groups=[0, 0], share_prompts=True)
    rows, pos = batch.predict_reads(21)
    with torch.no_grad():
        full = packed_hidden(model, batch)[batch.predict_index(21)]
        part = packed_hidden(model, batch, rows=rows)[pos]
    torch.testing.assert_close(part, full, atol=1e-6, rtol=1e-6)


# --- window, soft-capping and sinks in the SDPA paths (engine prefill, packed training) vs float64 ---

def segment_attention_fp64(q, k, v, segments, scale, window=0, softcap=0.0, sinks=None):
    """Each segment's queries over its prefix's keys then its own, causally (bottom-right), in float64: key j of a
    query at key index i is seen when j <= i and j > i - window; capped scores; sink column dropped. (T, H, D)."""
    h, kvh = q.shape[1], k.shape[1]
    outs = []
    for s, e, ps, pe in segments:
        rows = torch.cat((torch.arange(ps, pe), torch.arange(s, e)))
        kk = k[rows].double().repeat_interleave(h // kvh, 1)  # (K, H, D)
        vv = v[rows].double().repeat_interleave(h // kvh, 1)
        sc = torch.einsum("qhd,khd->hqk", q[s:e].double(), kk) * scale  # (H, Lq, K)
        if softcap:
            sc = softcap * torch.tanh(sc / softcap)
        i = torch.arange(pe - ps, pe - ps + e - s)[:, None]
        j = torch.arange(len(rows))[None, :]
        seen = (j <= i) & ((j > i - window) if window else True)
        sc = sc.masked_fill(~seen, float("-inf"))
        if sinks is not None:
            sc = torch.cat((sc, sinks.double()[:, None, None].expand(-1, e - s, 1)), -1)
        p = torch.softmax(sc, -1)[..., :len(rows)]
        outs.append(torch.einsum("hqk,khd->qhd", p, vv))
    return torch.cat(outs)


OPTS = [(0, 0.0, False), (6, 0.0, False), (0, 2.0, True), (6, 2.0, True), (1, 0.0, True)]


@pytest.mark.parametrize("window,softcap,use_sinks", OPTS)
def test_prefill_attention_options_match_fp64(window, softcap, use_sinks):
    """The engine's prefill (SDPA per sequence, explicit scores with capping / sinks) and its paged decode of the
    same tokens (the deterministic mode's path) against float64."""
    from rlhf_fast.models.layers import AttnMetadata, attention

    g = torch.Generator().manual_seed(window)
    lens = [1, 5, 13, 21]
    t = sum(lens)
    q, k, v = torch.randn(t, 6, 8, generator=g), torch.randn(t, 2, 8, generator=g), torch.randn(t, 2, 8, generator=g)
    sinks = torch.randn(6, generator=g) if use_sinks else None
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    segs = [(a, b, 0, 0) for a, b in zip(cu[:-1], cu[1:])]
    ref = segment_attention_fp64(q, k, v, segs, 0.5, window, softcap, sinks)
    out = attention(q, k, v, None, AttnMetadata(None, cu_seqlens=cu), 0.5, window, softcap, sinks)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # through a paged cache, one table row per query (as deterministic mode runs prefill)
    bs, tables, slot, ctx = 4, [], [], []
    nxt = 0
    for n in lens:
        nb = -(-n // bs)
        tab = list(range(nxt, nxt + nb))
        nxt += nb
        tables.extend([tab + [0] * (6 - nb)] * n)
        slot.extend(tab[p // bs] * bs + p % bs for p in range(n))
        ctx.extend(range(1, n + 1))
    kv = torch.full((2, nxt, bs, 2, 8), float("nan"))
    meta = AttnMetadata(torch.tensor(slot), block_tables=torch.tensor(tables, dtype=torch.int32),
                        context_lens=torch.tensor(ctx, dtype=torch.int32))
    paged = attention(q, k, v, kv, meta, 0.5, window, softcap, sinks)
    torch.testing.assert_close(paged.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["per-sample", "shared-unit", "shared-batched", "deterministic"])
@pytest.mark.parametrize("window,softcap,use_sinks", OPTS)
def test_packed_attention_options_fwd_bwd_fp64(layout, window, softcap, use_sinks, monkeypatch):
    """`models.packed`'s attention for every layout, forward and gradients (q, k, v, sinks) against float64."""
    from rlhf_fast.models import packed

    monkeypatch.setattr(packed, "BATCH_MIN_WORK", -(1 << 62) if layout == "shared-batched" else 1 << 62)
    prompts = [[1] * 9, [2] * 4, [2] * 4, [3] * 7, [3] * 7]
    responses = [[0] * 5, [0] * 11, [0] * 3, [0] * 6, [0] * 6]
    batch = pack(prompts, responses, groups=[0, 1, 1, 2, 2], share_prompts=layout != "per-sample")
    g = torch.Generator().manual_seed(7)
    t = batch.num_tokens
    leaves = [torch.randn(t, 4, 8, generator=g), torch.randn(t, 2, 8, generator=g), torch.randn(t, 2, 8, generator=g),
              torch.randn(4, generator=g)]
    w = torch.randn(t, 4, 8, generator=g)

    def run(fn, dtype):
        xs = [x.to(dtype).clone().requires_grad_() for x in leaves]
        out = fn(xs[0], xs[1], xs[2], xs[3] if use_sinks else None)
        (out * w.to(dtype)).sum().backward()
        return out, [x.grad for x in xs[:3]] + ([xs[3].grad] if use_sinks else [])

    attend = packed._SegmentAttention(batch, layout == "deterministic")
    out, grads = run(lambda q, k, v, s: attend(0, q, k, v, 0.4, window, softcap, s), torch.float32)
    ref, ref_grads = run(lambda q, k, v, s: segment_attention_fp64(q, k, v, batch.segments, 0.4, window, softcap, s),
                         torch.float64)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)
