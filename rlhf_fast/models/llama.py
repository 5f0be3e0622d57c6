"""Llama, Qwen2 and Mistral as one compact packed-token model bound to the Hugging Face model's own parameters.

Nothing is copied: every forward reads `hf.model.layers[i].self_attn.q_proj.weight` etc. at call time, so an optimizer
step on the Hugging Face model is what the next rollout sees. The HF classes are never patched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from rlhf_fast.models.layers import (AttnMetadata, BoundLM, apply_rotary, cache_attention, elementwise, project,
                                     rms_norm, rotary_tables)


def layer_windows(cfg) -> list[int]:
    """Each decoder layer's sliding window (0 = full attention), as transformers builds the masks: Llama none;
    Mistral `cfg.sliding_window` on every layer (None = none; it ignores `layer_types`); Qwen2 per
    `cfg.layer_types` ("sliding_attention" from layer `max_window_layers` on, only with `use_sliding_window`, which
    otherwise sets `sliding_window` to None). A query at position p sees keys at positions > p - window."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or 0
    if cfg.model_type == "llama" or getattr(cfg, "use_sliding_window", True) is False:
        return [0] * n  # Qwen2 keeps a window size it does not use
    types = getattr(cfg, "layer_types", None)
    if types is None and cfg.model_type == "qwen2":  # a config from before layer_types: the same rule
        first = getattr(cfg, "max_window_layers", 0)
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
    if cfg.model_type == "mistral" or types is None:
        return [window] * n
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{type(cfg).__name__}.layer_types has {unknown}: only full_attention and "
                         f"sliding_attention layers are supported")
    return [window if t == "sliding_attention" else 0 for t in types]


class LlamaFamilyLM(BoundLM):
    """Decoder of `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM` (or of their bare backbones
    `LlamaModel`, ..., which have no lm_head) over packed tokens."""

    def __init__(self, hf_model):
        cfg = hf_model.config
        self.hf = hf_model
        self.inner = hf_model.base_model  # the decoder (LlamaModel, ...); `hf_model` itself for a bare backbone
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        self.scale = self.head_dim ** -0.5
        self.windows = layer_windows(cfg)
        self.kv_window = max(self.windows) if min(self.windows) > 0 else 0
        self.max_context = cfg.max_position_embeddings
        self._rotary_key = None
        self._cos = self._sin = None

    def _rotary(self, positions: torch.Tensor):
        key = (self.device, self.dtype)
        if self._rotary_key != key:  # one table per device/dtype, shared by the engine and the scorer
            self._cos, self._sin = rotary_tables(self.inner.rotary_emb, self.max_context, self.dtype, self.device)
            self._rotary_key = key
        return self._cos[positions], self._sin[positions]

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        emb = self.inner.embed_tokens  # padding_idx as in nn.Embedding: that row gets no gradient
        return F.embedding(input_ids, emb.weight, emb.padding_idx), self._rotary(positions)  # (T, hidden), (T, D) x 2

    def layer_module(self, i: int) -> torch.nn.Module:
        return self.inner.layers[i]

    def layer(self, i: int, h: torch.Tensor, ctx, attend, det: bool,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = ctx
        t = h.shape[0]
        layer = self.inner.layers[i]
        att = layer.self_attn
        x = rms_norm(h, layer.input_layernorm.weight, self.eps)
        q = project(x, att.q_proj, det).view(t, self.num_heads, self.head_dim)
        k = project(x, att.k_proj, det).view(t, self.num_kv_heads, self.head_dim)
        v = project(x, att.v_proj, det).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = attend(i, q, k, v, self.scale, window=self.windows[i])  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        h = h + project(o.reshape(o.shape[0], -1), att.o_proj, det)
        x = rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
        mlp = layer.mlp
        gate = elementwise(self.act, project(x, mlp.gate_proj, det), det)
        return h + project(gate * project(x, mlp.up_proj, det), mlp.down_proj, det)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.inner.norm.weight, self.eps)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_cache: torch.Tensor | None, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """input_ids, positions (T,); kv_cache (num_layers, 2, num_blocks, block_size, KVH, D) or None;
        logit_rows (R,) indices of the tokens whose next-token logits are wanted (None = all).
        Returns logits (R, vocab) in float32."""
        h = self.decode(input_ids, positions, cache_attention(meta, kv_cache), meta.deterministic,
                        out_rows=logit_rows)  # prefill: the last layer's MLP on the rows that sample only
        return self.logits(self.final_norm(h), meta.deterministic)
