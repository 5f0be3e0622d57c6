"""Padding-free training forwards (`rlhf_fast.models.packed`) vs the Hugging Face forward, forward and backward."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_fast.models.packed import pack, packed_hidden

VOCAB = 97
PROMPTS = [[1, 5, 7, 9], [3] * 11, [4, 8]]
RESPONSES = [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30]]


def tiny(kind: str):
    """In eval mode: the packed forward has no dropout (PPO trainers turn it off), HF's must match that."""
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "llama":  # grouped-query attention, untied lm_head
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    if kind == "qwen2":  # q/k/v biases, tied embeddings
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def hf_hidden(model, seqs):
    """Right-padded HF backbone forward: list of (len, hidden) final hidden states."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    out = model.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, atol=2e-5):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_packed_matches_hf_forward_and_backward(kind):
    model = tiny(kind)
    seqs = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    weights = [torch.randn(len(s), 32, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(seqs)]
    ref = hf_hidden(model, seqs)
    g_ref = grads(model, sum((h * w).sum() for h, w in zip(ref, weights)))
    batch = pack(PROMPTS, RESPONSES)
    assert batch.num_tokens == sum(map(len, seqs))  # no padding
    assert batch.positions.tolist() == [t for s in seqs for t in range(len(s))]
    h = packed_hidden(model, batch)  # (T, hidden)
    torch.testing.assert_close(h, torch.cat(ref).detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(model, (h * torch.cat(weights)).sum()), g_ref)


def response_terms(model, batch, width):
    """Hidden states predicting each response token (N, width, H) and at each sequence's last token (N, H)."""
    h = packed_hidden(model, batch)
    return h[batch.predict_index(width)], h[batch.last_index()]


@pytest.mark.parametrize("batched", [False, True], ids=["unit-call", "prompt+batch"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prompt_equals_per_sample(kind, batched, monkeypatch):
    from rlhf_fast.models import packed

    monkeypatch.setattr(packed, "BATCH_MIN_WORK", -(1 << 62) if batched else 1 << 62)  # both forms of a prompt group
    model = tiny(kind)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    responses = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24], [30, 31]]
    groups = [0, 0, 0, 1, 1, 2]
    width = max(map(len, responses))
    mask = torch.zeros(len(responses), width, 1)
    for i, r in enumerate(responses):
        mask[i, :len(r)] = 1
    w = torch.randn(len(responses), width, 32, generator=torch.Generator().manual_seed(3))
    w_last = torch.randn(len(responses), 32, generator=torch.Generator().manual_seed(4))
    out, g = {}, {}
    for share in (False, True):
        batch = pack(prompts, responses, groups=groups, share_prompts=share)
        pred, last = response_terms(model, batch, width)
        out[share] = (pred * mask, last)
        g[share] = grads(model, (pred * mask * w).sum() + (last * w_last).sum())
    shared = pack(prompts, responses, groups=groups, share_prompts=True)
    assert shared.num_tokens == sum(map(len, responses)) + len(PROMPTS[0]) + len(PROMPTS[1]) + len(PROMPTS[2])
    torch.testing.assert_close(out[True][0], out[False][0].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1].detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(g[True], g[False])


@pytest.mark.parametrize("share", [False, True])
def test_deterministic_mode_is_batch_invariant(share):
    model = tiny("llama")
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    responses = [[11, 12, 13], [14, 15], [20, 21, 22, 23, 24, 25, 26], [27], [30]]
    groups = [0, 0, 1, 1, 2]
    with torch.no_grad():
        full = pack(prompts, responses, groups=groups, share_prompts=share)
        pred = packed_hidden(model, full, deterministic=True)[full.predict_index(7)]
        for lo, hi in [(0, 2), (2, 4), (4, 5)]:  # each prompt group alone
            alone = pack(prompts[lo:hi], responses[lo:hi], groups=groups[lo:hi], share_prompts=share)
            mine = packed_hidden(model, alone, deterministic=True)[alone.predict_index(7)]
            assert torch.equal(mine, pred[lo:hi])
        torch.testing.assert_close(pred, packed_hidden(model, full)[full.predict_index(7)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_a_whole_prompt_group_is_one_attention_unit(monkeypatch, batched):
    """Outside deterministic mode a shared prompt and its responses are one attention unit (not one call per
    sample): one masked SDPA call, or for a large enough unit two (the prompt, then its responses as one padded
    batch). Its result depends on that group only: reordering the groups of a batch (what PPO's update does to the
    scored rollout) gives bitwise the same hidden states, and a group packed alone agrees to fp32 rounding (the
    GEMMs over the stream may round differently at another row count; deterministic mode fixes that too)."""
    from rlhf_fast.models import packed
    from rlhf_fast.models.packed import _SegmentAttention

    model = tiny("llama")
    monkeypatch.setattr(packed, "BATCH_MIN_WORK", -(1 << 62) if batched else 1 << 62)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    responses = [[11, 12, 13], [14, 15], [16], [20, 21, 22, 23, 24, 25, 26], [27], [30]]
    groups = [0, 0, 0, 1, 1, 2]
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape[0]) or sdpa(q, *a, **kw))
    with torch.no_grad():
        full = pack(prompts, responses, groups=groups, share_prompts=True)
        assert [kind for kind, _ in _SegmentAttention(full, False).calls] == ["unit"] * 3
        pred = packed_hidden(model, full)[full.predict_index(7)]
        # per layer: one call per group, or each prompt (batch 1) then its 3, 2 and 1 responses as one batch
        assert calls == ([1, 3, 1, 2, 1, 1] if batched else [1, 1, 1]) * model.config.num_hidden_layers
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        order = [3, 4, 5, 0, 1, 2]  # groups 1, 2, 0
        moved = pack([prompts[i] for i in order], [responses[i] for i in order], groups=[groups[i] for i in order],
                     share_prompts=True)
        assert torch.equal(packed_hidden(model, moved)[moved.predict_index(7)], pred[order])
        for lo, hi in [(0, 3), (3, 5), (5, 6)]:
            alone = pack(prompts[lo:hi], responses[lo:hi], groups=groups[lo:hi], share_prompts=True)
            torch.testing.assert_close(packed_hidden(model, alone)[alone.predict_index(7)], pred[lo:hi],
                                       atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pred, packed_hidden(model, full, deterministic=True)[full.predict_index(7)],
                                   atol=1e-5, rtol=1e-5)


def test_layout_indices():
    b = pack([[1, 2], [1, 2], [5]], [[3, 4, 6], [7], []], groups=[0, 0, 1], share_prompts=True)
    assert b.input_ids.tolist() == [1, 2, 3, 4, 6, 7, 5]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 2, 0]
    assert b.segments == ((0, 2, 0, 0), (2, 5, 0, 2), (5, 6, 0, 2), (6, 7, 0, 0))
    assert b.predict_index(3).tolist() == [[1, 2, 3], [1, 1, 1], [6, 6, 6]]  # past a response's end: its last row
    assert b.last_index().tolist() == [4, 5, 6]  # an empty response scores the prompt's last token
    flat = pack([[1, 2], [5]], [[3, 4], [6]])
    assert flat.segments == ((0, 4, 0, 0), (4, 6, 0, 0))
    assert flat.predict_index(2).tolist() == [[1, 2], [4, 4]] and flat.last_index().tolist() == [3, 5]


def test_bad_input():
    with pytest.raises(ValueError, match="same prompt"):
        pack([[1], [2]], [[3], [4]], groups=[0, 0], share_prompts=True)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        pack([[1], []], [[3], [4]])
    with pytest.raises(ValueError, match="groups must have one entry per sequence"):
        pack([[1]], [[3]], groups=[0, 1])
    with pytest.raises(ValueError, match="over the model's context"):
        packed_hidden(tiny("gpt2"), pack([[1] * 60], [[2] * 10]))


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_read_rows_only_equals_full_forward(kind, deterministic):
    """`packed_hidden(rows=...)` (the last layer's output projection and MLP on the read rows alone) equals the
    full forward's rows (bitwise in deterministic mode: every op on a row is row-wise), and so do its gradients
    (within rounding: a weight gradient sums over fewer rows); with repeated rows through `predict_reads`, as the
    PPO passes read them."""
    model = tiny(kind)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    responses = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24], [30, 31]]
    batch = pack(prompts, responses, groups=[0, 0, 0, 1, 1, 2], share_prompts=True)
    index = batch.predict_index(5)  # (6, 5): rows past a response's end repeat its last row
    w = torch.randn(*index.shape, 32, generator=torch.Generator().manual_seed(3))
    full = packed_hidden(model, batch, deterministic=deterministic)
    g_full = grads(model, (full[index] * w).sum())
    rows, pos = batch.predict_reads(5)
    assert rows.numel() < batch.num_tokens and torch.equal(rows[pos], index)
    part = packed_hidden(model, batch, deterministic=deterministic, rows=rows)
    assert part.shape == (rows.numel(), 32)
    g_part = grads(model, (part[pos] * w).sum())
    if deterministic:
        assert torch.equal(part, full[rows].detach())
    else:
        torch.testing.assert_close(part, full[rows].detach(), atol=1e-6, rtol=1e-5)
    assert_grads_close(g_part, g_full)
    last = packed_hidden(model, batch, deterministic=deterministic, rows=batch.last_index())
    torch.testing.assert_close(last, full[batch.last_index()].detach(), atol=0 if deterministic else 1e-6,
                               rtol=0 if deterministic else 1e-5)


def test_scalar_head_reads_rows_only():
    """`ScalarHeadModel(batch, reads=...)` equals the full per-token values at the read rows (repeats included)."""
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models import from_hf

    model = ScalarHeadModel(from_hf(tiny("llama"))).eval()
    batch = pack([PROMPTS[0]] * 2 + [PROMPTS[1]], [[11, 12], [13, 14, 15], [20]], groups=[0, 0, 1],
                 share_prompts=True)
    index = batch.predict_index(3)
    full = model(batch)
    torch.testing.assert_close(model(batch, reads=batch.predict_reads(3)), full[index], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(batch, reads=batch.last_reads()), full[batch.last_index()],
                               atol=1e-6, rtol=1e-5)
