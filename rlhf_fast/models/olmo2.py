"""OLMo 2: Llama's attention and SwiGLU MLP with the norms moved after them, and q/k RMSNorm over the whole
projection (all heads at once, not per head as Qwen3 does).

    h = h + post_attn_norm(attn(h)),  h = h + post_mlp_norm(mlp(h))      (no norm before either)
    q = q_norm(q_proj(x)) over (heads * head_dim,), k = k_norm(k_proj(x)) over (kv_heads * head_dim,)

OLMo 2's RMSNorm multiplies by its weight in fp32 and casts after (`olmo_rms_norm`), Llama's casts first. Module
names (Hugging Face's in `HF_MODULES`):

    embed, layers.{i}.attn.{q,k,v,o}_proj, layers.{i}.attn.{q,k}_norm, layers.{i}.attn_post_norm,
    layers.{i}.mlp.{gate,up,down}_proj, layers.{i}.mlp_post_norm, norm, lm_head
"""
from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.models.layers import RMSNorm, activation, project
from rlhf_fast.models.llama import MLP, Attention, LlamaArgs, LlamaLM, gated_mlp, qkv, rotate

MODEL_TYPES = ("olmo2",)
HF_PREFIX = "model"
HF_MODULES = {  # our module name -> Hugging Face's, relative to the backbone
    "embed": "embed_tokens",
    "layers.{i}.attn.q_proj": "layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.k_proj": "layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.v_proj": "layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.o_proj": "layers.{i}.self_attn.o_proj",
    "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
    "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm",
    "layers.{i}.attn_post_norm": "layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp.gate_proj": "layers.{i}.mlp.gate_proj",
    "layers.{i}.mlp.up_proj": "layers.{i}.mlp.up_proj",
    "layers.{i}.mlp.down_proj": "layers.{i}.mlp.down_proj",
    "layers.{i}.mlp_post_norm": "layers.{i}.post_feedforward_layernorm",
    "norm": "norm",
}
HF_LAYERS = "layers"
TRANSPOSED: frozenset[str] = frozenset()


def olmo_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMo 2's RMSNorm over the last dim: (weight * x / rms(x)) in fp32, cast back to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return (weight * xf).to(x.dtype)


class Block(nn.Module):
    """OLMo 2 decoder layer `layer_idx`: h + attn_post_norm(attn(h)), then + mlp_post_norm(mlp(h))."""

    def __init__(self, a: LlamaArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, a.windows[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.eps, self.scale, self.act = a.norm_eps, a.head_dim ** -0.5, activation(a.act)
        self.attn = Attention(a)
        self.attn.q_norm = RMSNorm(a.num_heads * a.head_dim, a.norm_eps)
        self.attn.k_norm = RMSNorm(a.num_kv_heads * a.head_dim, a.norm_eps)
        self.attn_post_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.mlp = MLP(a)
        self.mlp_post_norm = RMSNorm(a.hidden_size, a.norm_eps)

    def forward(self, h: torch.Tensor, ctx, attend, deterministic: bool,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (T, hidden), ctx = rotary cos, signed sin (T, head_dim) -> (T, hidden), or (R, hidden) with `rows`
        (see `llama.Block.forward`)."""
        cos, sin = ctx
        t, det, att, eps = h.shape[0], deterministic, self.attn, self.eps
        q, k, v = qkv(att, h, self.num_heads, self.num_kv_heads, self.head_dim, det)
        q = olmo_rms_norm(q.reshape(t, -1), att.q_norm.weight, eps).view(t, self.num_heads, self.head_dim)
        k = olmo_rms_norm(k.reshape(t, -1), att.k_norm.weight, eps).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin, 0), rotate(k, cos, sin, 0)
        o = attend(self.layer_idx, q, k, v, self.scale, window=self.window)  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        h = h + olmo_rms_norm(project(o.reshape(o.shape[0], -1), att.o_proj, det), self.attn_post_norm.weight, eps)
        return h + olmo_rms_norm(gated_mlp(self.mlp, h, self.act, det), self.mlp_post_norm.weight, eps)


class Olmo2LM(LlamaLM):
    """OLMo 2 causal LM, or its bare backbone (`lm_head=False`)."""

    block = Block

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return olmo_rms_norm(h, self.norm.weight, self.args.norm_eps)
