"""Llama, Qwen2, Qwen3 and Mistral (and Phi-3's blocks): one decoder (RMSNorm, rotary, grouped-query attention,
SwiGLU MLP) over packed tokens.

They differ only in their config: Qwen2 has q/k/v biases, Qwen3 an RMSNorm on each head of q and k before the
rotary, Mistral a sliding window on every layer, Qwen2/3 a window on the layers from `max_window_layers` on
(`layer_windows`); Phi-3 (`models.phi3`) rotates only part of each head. Module names (Hugging Face's in
`HF_MODULES`):

    embed, layers.{i}.attn_norm, layers.{i}.attn.{q,k,v,o}_proj, layers.{i}.attn.{q,k}_norm (Qwen3),
    layers.{i}.mlp_norm, layers.{i}.mlp.{gate,up,down}_proj, norm, lm_head

A Phi-3 converted by `models.from_hf` shares transformers' fused `attn.qkv_proj` / `mlp.gate_up_proj` in place of
the three (two) projections; the block runs either.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rlhf_fast.models import packed_weights
from rlhf_fast.models.layers import DecoderLM, RMSNorm, Rope, activation, apply_rotary, elementwise, project, rms_norm
from rlhf_fast.models.loading import UnsupportedModelError

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
HF_PREFIX = "model"  # the backbone's name in a causal LM (a bare backbone checkpoint has no prefix)
HF_MODULES = {  # our module name -> Hugging Face's, relative to the backbone; `lm_head` sits beside it
    "embed": "embed_tokens",
    "layers.{i}.attn_norm": "layers.{i}.input_layernorm",
    "layers.{i}.attn.q_proj": "layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.k_proj": "layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.v_proj": "layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.o_proj": "layers.{i}.self_attn.o_proj",
    "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",  # Qwen3 only (a model without it has no such module)
    "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm",
    "layers.{i}.mlp_norm": "layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp.gate_proj": "layers.{i}.mlp.gate_proj",
    "layers.{i}.mlp.up_proj": "layers.{i}.mlp.up_proj",
    "layers.{i}.mlp.down_proj": "layers.{i}.mlp.down_proj",
    "norm": "norm",
}
HF_LAYERS = "layers"  # the backbone's ModuleList of decoder layers
TRANSPOSED: frozenset[str] = frozenset()  # projections whose HF weight is (in, out): none here


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


def rope_parameters(cfg, layer_type: str | None = None, *, partial: bool = False) -> tuple[torch.Tensor, float]:
    """(inv_freq (rotary_dim/2,) fp32 on the host, attention scaling) of `cfg`'s rotary embedding, as transformers
    computes them: its `ROPE_INIT_FUNCTIONS[rope_type]`, or the original RoPE (theta^(-2j/d)) for "default". Types whose
    frequencies depend on the sequence length at run time ("dynamic", "longrope") are refused. `layer_type`: the
    entry of a config whose `rope_parameters` has one per layer type (Gemma 3's "sliding_attention" local base and
    "full_attention" global one). `partial`: the default RoPE honours `partial_rotary_factor` (Phi-3; transformers'
    Llama ignores it), rotating the first int(head_dim * factor) dims of each head."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModelError(f"{type(cfg).__name__}: rope_type {rope_type!r} rescales the rotary frequencies "
                                    "with the sequence length at run time; it is not supported")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(f"{type(cfg).__name__}: unknown rope_type {rope_type!r}")
    with torch.device("cpu"):  # also inside `build_model(device="meta")`: the tables are made from these
        if rope_type != "default":
            kw = {} if layer_type is None else {"layer_type": layer_type}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), **kw)
            return inv_freq.float(), float(scaling)
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if partial:
            dim = int(dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


@dataclasses.dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int       # the MLP's inner width
    num_layers: int
    num_heads: int
    num_kv_heads: int            # < num_heads: grouped-query attention
    head_dim: int
    max_context: int             # max_position_embeddings: the rotary table's length, the longest sequence
    norm_eps: float              # rms_norm_eps
    act: str                     # hidden_act of the gated MLP ("silu")
    qkv_bias: bool               # Qwen2 (and Llama's attention_bias)
    o_bias: bool                 # Llama's attention_bias only
    mlp_bias: bool               # Llama's mlp_bias
    tie_embeddings: bool         # lm_head.weight is embed.weight
    windows: tuple[int, ...]     # per layer sliding window, 0 = full attention
    pad_token_id: int | None = None  # the embedding row that gets no gradient (nn.Embedding's padding_idx)
    qk_norm: bool = False        # Qwen3: RMSNorm (head_dim,) on each head of q and k, before the rotary
    rotary_dim: int = 0          # Phi-3's partial_rotary_factor: dims of each head rotated (0 = all)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if len(self.windows) != self.num_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.num_layers} layers")

    @classmethod
    def from_config(cls, cfg) -> LlamaArgs:
        """The args of a `LlamaConfig`, `Qwen2Config`, `Qwen3Config`, `MistralConfig` or `Phi3Config`."""
        qwen2 = cfg.model_type == "qwen2"
        bias = bool(getattr(cfg, "attention_bias", False))
        pad = getattr(cfg, "pad_token_id", None)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = 0
        if cfg.model_type == "phi3":
            rotary = int(head_dim * (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   head_dim=head_dim, max_context=cfg.max_position_embeddings, norm_eps=cfg.rms_norm_eps,
                   act=cfg.hidden_act, qkv_bias=qwen2 or bias, o_bias=bias and not qwen2,
                   mlp_bias=bool(getattr(cfg, "mlp_bias", False)) and not qwen2,
                   tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                   windows=tuple(layer_windows(cfg)), pad_token_id=pad if isinstance(pad, int) else None,
                   qk_norm=cfg.model_type == "qwen3", rotary_dim=rotary if rotary != head_dim else 0)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, q, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, kv, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, kv, bias=a.qkv_bias)
        self.o_proj = nn.Linear(q, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps)


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)


def qkv(att: nn.Module, x: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
        deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (T, heads, D), k, v (T, kv_heads, D) of x (T, hidden) through `att`'s q/k/v projections, or through a
    fused `qkv_proj` (rows q, k, v: a Phi-3 that `from_hf` converted shares transformers' module)."""
    t = x.shape[0]
    fused = getattr(att, "qkv_proj", None)
    y = packed_weights.fused(att, "qkv", x, deterministic)  # a rollout's oneDNN copy of q, k, v in one
    if y is not None:
        q, k, v = y.split((att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features), dim=-1)
    elif fused is not None:
        q, k, v = project(x, fused, deterministic).split((heads * head_dim, kv_heads * head_dim,
                                                          kv_heads * head_dim), dim=-1)
    else:
        q, k, v = (project(x, m, deterministic) for m in (att.q_proj, att.k_proj, att.v_proj))
    # heads from the projection's width: a tensor-parallel rank holds heads / tp of them
    return q.reshape(t, -1, head_dim), k.reshape(t, -1, head_dim), v.reshape(t, -1, head_dim)


def gated_mlp(mlp: nn.Module, x: torch.Tensor, act, deterministic: bool) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) of x (T, hidden) -> (T, hidden); a fused `gate_up_proj` (rows gate, up: a converted
    Phi-3) is split after the projection."""
    fused = getattr(mlp, "gate_up_proj", None)
    y = packed_weights.fused(mlp, "gate_up", x, deterministic)  # a rollout's oneDNN copy of gate, up in one
    if y is not None:
        g, u = y.split((mlp.gate_proj.out_features, mlp.up_proj.out_features), dim=-1)
    elif fused is not None:
        g, u = project(x, fused, deterministic).chunk(2, dim=-1)
    else:
        g, u = project(x, mlp.gate_proj, deterministic), project(x, mlp.up_proj, deterministic)
    return project(elementwise(act, g, deterministic) * u, mlp.down_proj, deterministic)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """`apply_rotary` on the first `rotary_dim` dims of each head of x (T, heads, D), the rest passed through
    (Phi-3's partial rotary; 0 = all dims)."""
    if not rotary_dim:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


class Block(nn.Module):
    """Decoder layer `layer_idx`: h + attn(attn_norm(h)), then + mlp(mlp_norm(h)), SwiGLU MLP."""

    def __init__(self, a: LlamaArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window, self.rotary_dim = layer_idx, a.windows[layer_idx], a.rotary_dim
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.eps, self.scale, self.act, self.qk_norm = a.norm_eps, a.head_dim ** -0.5, activation(a.act), a.qk_norm
        self.attn_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.attn = Attention(a)
        self.mlp_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.mlp = MLP(a)

    def forward(self, h: torch.Tensor, ctx, attend, deterministic: bool,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (T, hidden), ctx = rotary cos, signed sin (T, rotary dims) -> (T, hidden). `rows` (R,): only these rows'
        outputs are wanted, so everything after the attention (output projection, residual, MLP) runs on them
        alone -> (R, hidden); every row still gives its keys and values."""
        cos, sin = ctx
        det, att = deterministic, self.attn
        x = rms_norm(h, self.attn_norm.weight, self.eps)  # the weight only: a shared HF norm module works too
        q, k, v = qkv(att, x, self.num_heads, self.num_kv_heads, self.head_dim, det)
        if self.qk_norm:  # Qwen3: per head, over head_dim
            q, k = rms_norm(q, att.q_norm.weight, self.eps), rms_norm(k, att.k_norm.weight, self.eps)
        q, k = rotate(q, cos, sin, self.rotary_dim), rotate(k, cos, sin, self.rotary_dim)
        o = attend(self.layer_idx, q, k, v, self.scale, window=self.window)  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        h = h + project(o.reshape(o.shape[0], -1), att.o_proj, det)
        return h + gated_mlp(self.mlp, rms_norm(h, self.mlp_norm.weight, self.eps), self.act, det)


class LlamaLM(DecoderLM):
    """Llama / Qwen2 / Qwen3 / Mistral / Phi-3 causal LM, or its bare backbone (`lm_head=False`: reward and value
    models). A family with other blocks on the same args (OLMo 2) sets `block`."""

    block: type[nn.Module] = Block

    def __init__(self, config, *, lm_head: bool = True):
        args = LlamaArgs.from_config(config)
        super().__init__(config, args)
        rope = rope_parameters(config, partial=bool(args.rotary_dim))
        self.rope = Rope(*rope, args.max_context)  # a plain object: not in the state dict
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, args.pad_token_id)
        self.layers = nn.ModuleList(self.block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        if lm_head:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.lm_head.weight = self.embed.weight

    def embed_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor):
        # the embedding called as a module (its padding_idx row gets no gradient), so that hooks put on it from
        # outside run (`parallelize`'s vocab-parallel embedding)
        return self.embed(input_ids), self.rope(positions, self.dtype)  # (T, hidden)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.norm.weight, self.args.norm_eps)
