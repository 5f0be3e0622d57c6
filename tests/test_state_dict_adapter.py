"""The state-dict adapter: HF names <-> ours, HF checkpoints -> our models (same logits, no second copy), our
exports -> `AutoModelForCausalLM` / `AutoModel` (the same tensors, bitwise, in the same dtype)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_fast.models import state_dict_adapter as sda
from rlhf_fast.models.loading import ModelLoadError
from rlhf_fast.models.state_dict_adapter import from_hf_name, is_transposed, to_hf_name

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
CASES = {  # name -> (config, causal LM class, backbone class)
    "llama_tied": (lambda: tf.LlamaConfig(**SMALL, tie_word_embeddings=True), tf.LlamaForCausalLM, tf.LlamaModel),
    "llama": (lambda: tf.LlamaConfig(**SMALL, tie_word_embeddings=False), tf.LlamaForCausalLM, tf.LlamaModel),
    "qwen2": (lambda: tf.Qwen2Config(**SMALL, tie_word_embeddings=False), tf.Qwen2ForCausalLM, tf.Qwen2Model),
    "mistral": (lambda: tf.MistralConfig(**SMALL, sliding_window=5, tie_word_embeddings=False),
                tf.MistralForCausalLM, tf.MistralModel),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                   eos_token_id=2, tie_word_embeddings=True), tf.GPT2LMHeadModel, tf.GPT2Model),
}


def hf_model(case: str, *, backbone: bool = False, dtype=torch.float32, seed: int = 0):
    """A tiny randomly initialised transformers model of `case` (biases and norms random too, so a swap shows)."""
    make, causal, bare = CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (bare if backbone else causal)(make())
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------- names only

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backbone", [False, True])
def test_names_round_trip(case, backbone):
    model = hf_model(case, backbone=backbone)
    ours = set()
    for key in model.state_dict():
        name = from_hf_name(key, model.config)
        assert name is not None, key
        assert to_hf_name(name, model.config, backbone=backbone) == key
        ours.add(name)
    assert any(n.startswith("layers.1.") for n in ours) and "embed.weight" in ours and "norm.weight" in ours
    assert ("lm_head.weight" in ours) == (not backbone)


def test_names_of_each_family():
    llama, gpt2 = CASES["qwen2"][0](), CASES["gpt2"][0]()
    assert from_hf_name("model.layers.3.self_attn.q_proj.bias", llama) == "layers.3.attn.q_proj.bias"
    assert from_hf_name("layers.3.post_attention_layernorm.weight", llama) == "layers.3.mlp_norm.weight"
    assert from_hf_name("model.embed_tokens.weight", llama) == from_hf_name("embed_tokens.weight", llama)
    assert to_hf_name("layers.0.attn_norm.weight", llama) == "model.layers.0.input_layernorm.weight"
    assert to_hf_name("norm.weight", llama, backbone=True) == "norm.weight"
    assert from_hf_name("transformer.wpe.weight", gpt2) == "pos_embed.weight"
    assert to_hf_name("norm.bias", gpt2) == "transformer.ln_f.bias"
    assert to_hf_name("layers.1.mlp.c_fc.weight", gpt2, backbone=True) == "h.1.mlp.c_fc.weight"
    assert is_transposed("layers.1.attn.c_attn.weight", gpt2) and not is_transposed("layers.1.attn.c_attn.bias", gpt2)
    assert not is_transposed("layers.0.attn.q_proj.weight", llama)
    # wrappers' key segments (activation checkpointing, compile) are not part of the name
    assert to_hf_name("layers.0._checkpoint_wrapped_module.attn.o_proj.weight", llama) == \
        "model.layers.0.self_attn.o_proj.weight"


def test_buffers_are_ignored_and_strangers_refused():
    llama, gpt2 = CASES["llama"][0](), CASES["gpt2"][0]()
    assert from_hf_name("transformer.h.0.attn.bias", gpt2) is None
    assert from_hf_name("h.0.attn.masked_bias", gpt2) is None
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq", llama) is None
    assert from_hf_name("model.rotary_emb.inv_freq", llama) is None
    with pytest.raises(KeyError, match="score.weight"):
        from_hf_name("score.weight", llama)
    with pytest.raises(KeyError, match="lm_head"):
        to_hf_name("lm_head.weight", llama, backbone=True)
    with pytest.raises(ModelLoadError, match="bert"):
        from_hf_name("embeddings.word_embeddings.weight", tf.BertConfig())
