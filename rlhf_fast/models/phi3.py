"""Phi-3 (and Phi-4-mini, `model_type` "phi3"): Llama's decoder (`models.llama`) with a partial rotary
(`partial_rotary_factor`) and a sliding window on every layer when the config sets one.

Hugging Face stores the attention's q/k/v projections as one fused `qkv_proj` (rows: q, then k, then v) and the
MLP's gate and up projections as one `gate_up_proj` (rows: gate, then up). Ours are separate `nn.Linear`s, as in
Llama, so LoRA targets and the blocks are the same: the state-dict adapter splits a fused tensor on load and
concatenates the parts back on export (`HF_SPLIT`). A transformers Phi-3 converted by `models.from_hf` keeps
sharing its modules: it holds the fused `attn.qkv_proj` / `mlp.gate_up_proj` themselves (no copy), which the
blocks split after the projection (`llama.qkv`, `llama.gated_mlp`).

Rotary scalings that change with the run-time length (`longrope`, which transformers also picks for the "su" and
"yarn" types of Phi-3 configs) are refused (`llama.rope_parameters`).
"""
from __future__ import annotations

from rlhf_fast.models.llama import LlamaLM

MODEL_TYPES = ("phi3",)
HF_PREFIX = "model"
HF_MODULES = {  # our module name -> Hugging Face's, relative to the backbone
    "embed": "embed_tokens",
    "layers.{i}.attn_norm": "layers.{i}.input_layernorm",
    "layers.{i}.attn.qkv_proj": "layers.{i}.self_attn.qkv_proj",  # fused: see HF_SPLIT
    "layers.{i}.attn.o_proj": "layers.{i}.self_attn.o_proj",
    "layers.{i}.mlp_norm": "layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp.gate_up_proj": "layers.{i}.mlp.gate_up_proj",  # fused: see HF_SPLIT
    "layers.{i}.mlp.down_proj": "layers.{i}.mlp.down_proj",
    "norm": "norm",
}
HF_SPLIT = {  # a fused module (our name for it, as `from_hf` shares it) -> the sibling modules our model holds,
    # in the order of their rows in the fused weight; each part's row count is its own weight's
    "layers.{i}.attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "layers.{i}.mlp.gate_up_proj": ("gate_proj", "up_proj"),
}
HF_LAYERS = "layers"
TRANSPOSED: frozenset[str] = frozenset()


class Phi3LM(LlamaLM):
    """Phi-3 causal LM, or its bare backbone (`lm_head=False`): `llama.LlamaLM` on a Phi-3 config."""
