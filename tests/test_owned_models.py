"""rlhf_fast's own decoders (`models.build_model`) against the transformers models of the same config: the same
logits from the same weights, conversions that share the HF modules, the rotary tables, and the refusals."""
import gc
import weakref

import pytest
import torch
from test_rollout_engine import VOCAB, tiny
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from rlhf_fast import models
from rlhf_fast.models import UnsupportedModelError, build_model, from_hf, module_pairs
from rlhf_fast.models.layers import cache_attention, linear, project
from rlhf_fast.rollout import block_table

KINDS = ["llama", "qwen2", "mistral", "gpt2"]
SEQS = [[1, 2, 3, 4, 5], [7] * 19, [100, 3]]


def loaded(hf):
    """build_model(hf.config) holding `hf`'s weights, the HF names mapped by hand (GPT-2's Conv1D transposed)."""
    fam = models._hf_family(type(hf))
    ours = build_model(hf.config)
    pairs, src = dict(module_pairs(fam, ours.num_layers)), hf.state_dict()
    state = {}
    for key in ours.state_dict():
        mod, _, name = key.rpartition(".")
        t = src[f"lm_head.{name}" if mod == "lm_head" else f"{hf.base_model_prefix}.{pairs[mod]}.{name}"]
        state[key] = t.t().contiguous() if mod.rpartition(".")[2] in fam.TRANSPOSED and name == "weight" else t
    ours.load_state_dict(state)
    return ours


def logits(lm, deterministic=False):
    inputs = block_table.prefill_inputs(SEQS, None, 4, torch.device("cpu"), deterministic=False, logits="all")
    with torch.no_grad():
        h = lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, None), deterministic)
        return lm.logits(h, deterministic)


@pytest.mark.parametrize("kind", KINDS)
def test_built_model_matches_hf_and_the_converted_model(kind):
    hf = tiny(kind)
    ours, converted = loaded(hf), from_hf(hf)
    assert ours.lm_head.weight is ours.embed.weight if hf.config.tie_word_embeddings else True
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in SEQS]).double()
    for det in (False, True):
        got = logits(ours, det)
        assert got.dtype == torch.float32 and got.shape == (sum(map(len, SEQS)), VOCAB)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
        assert torch.equal(got, logits(converted, det))


@pytest.mark.parametrize("kind", KINDS)
def test_from_hf_shares_the_modules(kind):
    hf = tiny(kind)
    lm = from_hf(hf)
    assert from_hf(hf) is lm
    ptrs = {p.data_ptr() for p in lm.parameters()}
    assert ptrs == {p.data_ptr() for p in hf.parameters()}  # every parameter shared, none copied
    before = logits(lm)
    with torch.no_grad():
        hf.get_input_embeddings().weight[7].add_(1.0)  # in place: ours sees it
    assert not torch.equal(logits(lm), before)
    inner = hf.base_model
    layers = inner.layers if kind != "gpt2" else inner.h
    mlp = layers[0].mlp
    name = "up_proj" if kind != "gpt2" else "c_fc"
    new = torch.nn.Linear(hf.config.hidden_size, getattr(mlp, name).weight.shape[0 if kind != "gpt2" else 1])
    setattr(mlp, name, new)  # a replaced leaf (peft injecting an adapter does this) is shared on the next call
    assert from_hf(hf) is lm and getattr(lm.layers[0].mlp, name) is new


def test_the_conversion_cache_keeps_no_model_alive():
    hf = tiny("llama")
    from_hf(hf)
    ref = weakref.ref(hf)
    del hf
    gc.collect()
    assert ref() is None


def test_blocks_are_called_as_modules():
    lm = from_hf(tiny("qwen2"))
    seen = []
    handle = lm.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    try:
        logits(lm)
    finally:
        handle.remove()
    assert seen == [(sum(map(len, SEQS)), lm.config.hidden_size)]


def test_backbone_and_meta_build():
    cfg = tiny("llama").config
    bare = build_model(cfg, lm_head=False, device="meta")
    assert bare.lm_head is None and all(p.is_meta for p in bare.parameters())
    assert not any("rope" in k or "inv_freq" in k for k in bare.state_dict())  # rotary tables are not state
    backbone = from_hf(LlamaModel(cfg))
    assert backbone.lm_head is None
    with pytest.raises(TypeError, match="backbone"):
        backbone.logits(torch.zeros(1, cfg.hidden_size), False)


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_tables_equal_hf_bitwise(rope, dtype):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                      rope_parameters=dict(ROPES[rope]))
    lm = build_model(cfg, device="meta").to_empty(device="cpu").to(dtype)
    pos = torch.arange(cfg.max_position_embeddings)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 1, dtype=dtype), pos[None])  # (1, P, D)
    ours_cos, ours_sin = lm.rope(pos, dtype)  # (P, D), the sin's first half negated
    half = lm.head_dim // 2
    assert torch.equal(ours_cos, cos[0]) and torch.equal(ours_sin, torch.cat((-sin[0, :, :half], sin[0, :, half:]), 1))


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_run_time_rope_is_refused(rope):
    params = {"rope_type": rope, "rope_theta": 10000.0, "factor": 2.0}
    if rope == "longrope":
        params.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=64)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
                      max_position_embeddings=256, rope_parameters=params)
    with pytest.raises(UnsupportedModelError, match=f"rope_type '{rope}'.*sequence length"):
        build_model(cfg, device="meta")


def test_uncovered_family_is_refused_naming_the_covered_ones():
    import re

    from transformers import CohereConfig

    with pytest.raises(UnsupportedModelError, match="cohere.*" + re.escape(", ".join(models.covered_families()))):
        build_model(CohereConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4), device="meta")


class _LoRALinear(torch.nn.Module):
    """The duck type `layers.project` takes for `models.lora.LoRALinear`."""

    def __init__(self, d_in, d_out, r, scaling):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in))
        self.bias = torch.nn.Parameter(torch.randn(d_out))
        self.lora_A = torch.nn.Linear(d_in, r, bias=False)
        self.lora_B = torch.nn.Linear(r, d_out, bias=False)
        self.scaling, self.dropout, self.disabled = scaling, torch.nn.Identity(), False


@pytest.mark.parametrize("deterministic", [False, True])
def test_project_computes_a_lora_linear(deterministic):
    torch.manual_seed(0)
    mod, x = _LoRALinear(24, 40, 4, 0.5), torch.randn(37, 24)
    with torch.no_grad():
        mod.lora_B.weight.normal_()
        want = x.double() @ mod.weight.double().T + mod.bias.double()
        delta = 0.5 * (x.double() @ mod.lora_A.weight.double().T @ mod.lora_B.weight.double().T)
        torch.testing.assert_close(project(x, mod, deterministic).double(), want + delta, atol=1e-4, rtol=1e-5)
        mod.disabled = True
        assert torch.equal(project(x, mod, deterministic), linear(x, mod.weight, mod.bias, deterministic))
