"""Gemma 2 and Gemma 3 (text): grouped-query attention with sliding-window layers alternating with global ones
(`layer_types`), norms before and after both the attention and the MLP, a GELU-gated MLP, embeddings scaled by
sqrt(hidden) and a tied lm_head.

    h = h + attn_post_norm(attn(attn_norm(h))),  h = h + mlp_post_norm(mlp(mlp_norm(h)))

Gemma's RMSNorm scales by (1 + weight) in fp32 (`gemma_rms_norm`; the weights start at 0). The attention scale is
query_pre_attn_scalar^-1/2, not head_dim^-1/2. Gemma 2 soft-caps the attention scores (attn_logit_softcapping: s ->
c tanh(s / c)) and the logits (final_logit_softcapping, `DecoderLM.final_logit_softcap`). Gemma 3 drops the
attention soft-cap (transformers' Gemma 3 never applies attn_logit_softcapping, nor do we), adds an RMSNorm on each
head of q and k, and gives the sliding layers their own rotary base (`rope_parameters["sliding_attention"]`, the
old `rope_local_base_freq`) beside the global one. Module names (Hugging Face's in `HF_MODULES`):

    embed, layers.{i}.attn_norm, layers.{i}.attn.{q,k,v,o}_proj, layers.{i}.attn.{q,k}_norm (Gemma 3),
    layers.{i}.attn_post_norm, layers.{i}.mlp_norm, layers.{i}.mlp.{gate,up,down}_proj, layers.{i}.mlp_post_norm,
    norm, lm_head
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rlhf_fast.models.layers import DecoderLM, Rope, activation, project
from rlhf_fast.models.llama import gated_mlp, layer_windows, qkv, rope_parameters, rotate
from rlhf_fast.models.loading import UnsupportedModelError

MODEL_TYPES = ("gemma2", "gemma3_text")
HF_PREFIX = "model"
HF_MODULES = {  # our module name -> Hugging Face's, relative to the backbone
    "embed": "embed_tokens",
    "layers.{i}.attn_norm": "layers.{i}.input_layernorm",
    "layers.{i}.attn.q_proj": "layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.k_proj": "layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.v_proj": "layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.o_proj": "layers.{i}.self_attn.o_proj",
    "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",  # Gemma 3 only
    "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm",
    "layers.{i}.attn_post_norm": "layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp_norm": "layers.{i}.pre_feedforward_layernorm",
    "layers.{i}.mlp.gate_proj": "layers.{i}.mlp.gate_proj",
    "layers.{i}.mlp.up_proj": "layers.{i}.mlp.up_proj",
    "layers.{i}.mlp.down_proj": "layers.{i}.mlp.down_proj",
    "layers.{i}.mlp_post_norm": "layers.{i}.post_feedforward_layernorm",
    "norm": "norm",
}
HF_LAYERS = "layers"
TRANSPOSED: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class GemmaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int             # max_position_embeddings
    norm_eps: float              # rms_norm_eps
    act: str                     # hidden_activation ("gelu_pytorch_tanh")
    bias: bool                   # attention_bias: q/k/v/o biases
    scale: float                 # query_pre_attn_scalar ** -0.5
    attn_softcap: float          # Gemma 2's attn_logit_softcapping (0: none)
    final_logit_softcap: float   # final_logit_softcapping (0: none)
    qk_norm: bool                # Gemma 3: RMSNorm (1 + w) on each head of q and k
    windows: tuple[int, ...]     # per layer sliding window, 0 = full attention
    local_rope: tuple[bool, ...]  # per layer: the sliding layers' rotary base (Gemma 3), else the global one
    tie_embeddings: bool = True
    pad_token_id: int | None = None

    @classmethod
    def from_config(cls, cfg) -> GemmaArgs:
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{type(cfg).__name__}: use_bidirectional_attention (an encoder) is not "
                                        "supported: rlhf_fast's decoders are causal")
        gemma3 = cfg.model_type == "gemma3_text"
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        pad = getattr(cfg, "pad_token_id", None)
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   max_context=cfg.max_position_embeddings, norm_eps=cfg.rms_norm_eps, act=cfg.hidden_activation,
                   bias=bool(getattr(cfg, "attention_bias", False)), scale=cfg.query_pre_attn_scalar ** -0.5,
                   attn_softcap=0.0 if gemma3 else float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
                   final_logit_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
                   qk_norm=gemma3, windows=tuple(layer_windows(cfg)),
                   local_rope=tuple(gemma3 and t == "sliding_attention" for t in types),
                   tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
                   pad_token_id=pad if isinstance(pad, int) else None)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm over the last dim: x / rms(x) * (1 + weight), all in fp32, cast back to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm (`gemma_rms_norm`): `weight` (hidden,) starts at 0, the scale being 1 + weight."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, a: GemmaArgs):
        super().__init__()
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, q, bias=a.bias)
        self.k_proj = nn.Linear(a.hidden_size, kv, bias=a.bias)
        self.v_proj = nn.Linear(a.hidden_size, kv, bias=a.bias)
        self.o_proj = nn.Linear(q, a.hidden_size, bias=a.bias)
        if a.qk_norm:
            self.q_norm = GemmaRMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = GemmaRMSNorm(a.head_dim, a.norm_eps)


class MLP(nn.Module):
    def __init__(self, a: GemmaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)


class Block(nn.Module):
    """Gemma decoder layer `layer_idx`: h + attn_post_norm(attn(attn_norm(h))), then
    + mlp_post_norm(mlp(mlp_norm(h)))."""

    def __init__(self, a: GemmaArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window, self.local = layer_idx, a.windows[layer_idx], a.local_rope[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.eps, self.scale, self.softcap, self.act = a.norm_eps, a.scale, a.attn_softcap, activation(a.act)
        self.qk_norm = a.qk_norm
        self.attn_norm = GemmaRMSNorm(a.hidden_size, a.norm_eps)
        self.attn = Attention(a)
        self.attn_post_norm = GemmaRMSNorm(a.hidden_size, a.norm_eps)
        self.mlp_norm = GemmaRMSNorm(a.hidden_size, a.norm_eps)
        self.mlp = MLP(a)
        self.mlp_post_norm = GemmaRMSNorm(a.hidden_size, a.norm_eps)

    def forward(self, h: torch.Tensor, ctx, attend, deterministic: bool,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (T, hidden), ctx = (global, local) rotary (cos, signed sin) pairs, each (T, head_dim) -> (T, hidden), or
        (R, hidden) with `rows` (see `llama.Block.forward`)."""
        cos, sin = ctx[1] if self.local else ctx[0]
        det, att, eps = deterministic, self.attn, self.eps
        q, k, v = qkv(att, gemma_rms_norm(h, self.attn_norm.weight, eps), self.num_heads, self.num_kv_heads,
                      self.head_dim, det)
        if self.qk_norm:  # Gemma 3: per head, over head_dim
            q, k = gemma_rms_norm(q, att.q_norm.weight, eps), gemma_rms_norm(k, att.k_norm.weight, eps)
        q, k = rotate(q, cos, sin, 0), rotate(k, cos, sin, 0)
        o = attend(self.layer_idx, q, k, v, self.scale, window=self.window, softcap=self.softcap)  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        o = project(o.reshape(o.shape[0], -1), att.o_proj, det)
        h = h + gemma_rms_norm(o, self.attn_post_norm.weight, eps)
        m = gated_mlp(self.mlp, gemma_rms_norm(h, self.mlp_norm.weight, eps), self.act, det)
        return h + gemma_rms_norm(m, self.mlp_post_norm.weight, eps)


class GemmaLM(DecoderLM):
    """Gemma 2 / Gemma 3 text causal LM (lm_head tied to the embedding, logits soft-capped when the config says so),
    or its bare backbone (`lm_head=False`)."""

    def __init__(self, config, *, lm_head: bool = True):
        args = GemmaArgs.from_config(config)
        super().__init__(config, args)
        if config.model_type == "gemma3_text":  # one rotary per layer type: global and local bases
            self.rope = Rope(*rope_parameters(config, "full_attention"), args.max_context)
            self.local_rope = Rope(*rope_parameters(config, "sliding_attention"), args.max_context)
        else:
            self.rope = self.local_rope = Rope(*rope_parameters(config), args.max_context)
        self.embed_scale = {  # times the embeddings: sqrt(hidden) in fp32, rounded to the model's dtype (as HF)
            dt: torch.tensor(args.hidden_size ** 0.5, dtype=torch.float32, device="cpu").to(dt).item()
            for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, args.pad_token_id)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = GemmaRMSNorm(args.hidden_size, args.norm_eps)
        if lm_head:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.lm_head.weight = self.embed.weight

    def embed_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor):
        # the embedding called as a module, so that hooks put on it from outside run (`parallelize`); transformers'
        # own (a model `from_hf` converted shares it) scales by itself
        dt, h = self.dtype, self.embed(input_ids)  # (T, hidden)
        if getattr(self.embed, "embed_scale", None) is None:
            h = h * self.embed_scale[dt]
        glob = self.rope(positions, dt)
        return h, (glob, glob if self.local_rope is self.rope else self.local_rope(positions, dt))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(h, self.norm.weight, self.args.norm_eps)
