"""The decoders converted from Hugging Face models (`models.from_hf`, sharing their modules) vs their forward."""
import pytest
import torch
from test_rollout_engine import tiny

from rlhf_fast.models import UnsupportedModelError, from_hf
from rlhf_fast.models.layers import ROW_CHUNK, cache_attention, linear
from rlhf_fast.rollout import block_table

SEQS = [[1, 2, 3, 4, 5], [7] * 19, [100, 3]]


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor([toks])).logits[0].double()


def logits_of(lm, inputs, kv):
    with torch.no_grad():
        det = inputs.meta.deterministic
        return lm.logits(lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, kv), det), det)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_packed_forward_matches_hf(kind, deterministic):
    model = tiny(kind)
    lm = from_hf(model)
    bs = 4
    tables, nxt = [], 0
    for s in SEQS:  # a private cache, blocks handed out in reverse to exercise the tables
        nb = -(-len(s) // bs)
        tables.append(list(range(nxt + nb - 1, nxt - 1, -1)))
        nxt += nb
    kv = torch.full((lm.num_layers, 2, nxt, bs, lm.num_kv_heads, lm.head_dim), float("nan"))
    inputs = block_table.prefill_inputs(SEQS, tables, bs, torch.device("cpu"), deterministic=deterministic,
                                        logits="all")
    logits = logits_of(lm, inputs, kv)
    assert logits.dtype == torch.float32 and logits.shape == (sum(map(len, SEQS)), 128)
    ref = torch.cat([hf_logits(model, s) for s in SEQS])
    torch.testing.assert_close(logits.double(), ref, atol=2e-5, rtol=1e-5)
    written = torch.zeros(nxt * bs, dtype=torch.bool)
    for s, t in zip(SEQS, tables):
        written[block_table.slots(t, 0, len(s), bs)] = True
    flat = kv.view(lm.num_layers, 2, nxt * bs, -1)
    assert not flat[:, :, written].isnan().any() and flat[:, :, ~written].isnan().all()  # each token's slot, only


def test_deterministic_linear_is_batch_invariant():
    w, b = torch.randn(96, 40), torch.randn(96)
    x = torch.randn(3 * ROW_CHUNK + 5, 40)
    full = linear(x, w, b, True)
    torch.testing.assert_close(full, x @ w.t() + b, atol=1e-5, rtol=1e-5)
    for lo, hi in [(0, 1), (7, 9), (17, 50)]:
        assert torch.equal(linear(x[lo:hi], w, b, True), full[lo:hi])


def test_reads_live_parameters():
    model = tiny("qwen2")
    lm = from_hf(model)
    assert lm.layers[1].attn.q_proj is model.model.layers[1].self_attn.q_proj and from_hf(model) is lm
    inputs = block_table.prefill_inputs(SEQS[:1], None, 4, torch.device("cpu"), deterministic=False, logits="all")
    before = logits_of(lm, inputs, None)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.bias.add_(1.0)  # Qwen2's q/k/v biases are used
    after = logits_of(lm, inputs, None)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), hf_logits(model, SEQS[0]), atol=2e-5, rtol=1e-5)


def test_unsupported_model_class():
    class FakeLlama(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="unsupported model class FakeLlama.*LlamaForCausalLM"):
        from_hf(FakeLlama())
