"""GPT-2 over packed tokens: learned positions, LayerNorm, fused q/k/v projection, GELU MLP.

Module names (Hugging Face's in `HF_MODULES`):

    embed, pos_embed, layers.{i}.ln_1, layers.{i}.attn.{c_attn,c_proj}, layers.{i}.ln_2,
    layers.{i}.mlp.{c_fc,c_proj}, norm, lm_head (tied to embed)

Our projections are `nn.Linear` (weight (out, in)); Hugging Face's `Conv1D` keeps (in, out), so checkpoint I/O
transposes the `TRANSPOSED` ones. A model converted by `from_hf` shares the HF `Conv1D` modules themselves
(`layers.project` takes either).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast.models.layers import DecoderLM, activation, elementwise, project
from rlhf_fast.models.loading import UnsupportedModelError

MODEL_TYPES = ("gpt2",)
HF_PREFIX = "transformer"
HF_MODULES = {
    "embed": "wte",
    "pos_embed": "wpe",
    "layers.{i}.ln_1": "h.{i}.ln_1",
    "layers.{i}.attn.c_attn": "h.{i}.attn.c_attn",
    "layers.{i}.attn.c_proj": "h.{i}.attn.c_proj",
    "layers.{i}.ln_2": "h.{i}.ln_2",
    "layers.{i}.mlp.c_fc": "h.{i}.mlp.c_fc",
    "layers.{i}.mlp.c_proj": "h.{i}.mlp.c_proj",
    "norm": "ln_f",
}
HF_LAYERS = "h"
TRANSPOSED = frozenset({"c_attn", "c_proj", "c_fc"})  # HF Conv1D weights are (in, out)


@dataclasses.dataclass(frozen=True)
class GPT2Args:
    vocab_size: int
    hidden_size: int             # n_embd
    inner_size: int              # n_inner, default 4 * n_embd
    num_layers: int
    num_heads: int
    head_dim: int
    max_context: int             # n_positions: rows of the learned position table
    norm_eps: float              # layer_norm_epsilon
    act: str                     # activation_function ("gelu_new")
    scales: tuple[float, ...]    # per layer attention scale (scale_attn_weights, scale_attn_by_inverse_layer_idx)
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ValueError(f"n_embd {self.hidden_size} is not a multiple of n_head {self.num_heads}")

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def windows(self) -> tuple[int, ...]:
        return (0,) * self.num_layers

    @classmethod
    def from_config(cls, cfg) -> GPT2Args:
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        n, heads = cfg.n_layer, cfg.n_head
        base = (cfg.n_embd // heads) ** -0.5 if cfg.scale_attn_weights else 1.0
        by_layer = getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, inner_size=cfg.n_inner or 4 * cfg.n_embd,
                   num_layers=n, num_heads=heads, head_dim=cfg.n_embd // heads, max_context=cfg.n_positions,
                   norm_eps=cfg.layer_norm_epsilon, act=cfg.activation_function,
                   scales=tuple(base / (i + 1) if by_layer else base for i in range(n)),
                   tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)))


class Attention(nn.Module):
    def __init__(self, a: GPT2Args):
        super().__init__()
        self.c_attn = nn.Linear(a.hidden_size, 3 * a.hidden_size)
        self.c_proj = nn.Linear(a.hidden_size, a.hidden_size)


class MLP(nn.Module):
    def __init__(self, a: GPT2Args):
        super().__init__()
        self.c_fc = nn.Linear(a.hidden_size, a.inner_size)
        self.c_proj = nn.Linear(a.inner_size, a.hidden_size)


class Block(nn.Module):
    """GPT-2 layer `layer_idx`: h + attn(ln_1(h)), then + mlp(ln_2(h)). No dropout (the rollout's and trainer's
    forward alike)."""

    def __init__(self, a: GPT2Args, layer_idx: int):
        super().__init__()
        self.layer_idx, self.scale, self.eps, self.act = layer_idx, a.scales[layer_idx], a.norm_eps, activation(a.act)
        self.num_heads, self.head_dim = a.num_heads, a.head_dim
        self.ln_1 = nn.LayerNorm(a.hidden_size, eps=a.norm_eps)
        self.attn = Attention(a)
        self.ln_2 = nn.LayerNorm(a.hidden_size, eps=a.norm_eps)
        self.mlp = MLP(a)

    def _ln(self, x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, self.eps)

    def forward(self, h: torch.Tensor, ctx, attend, deterministic: bool,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (T, hidden) -> (T, hidden), or (R, hidden) with `rows` (see `llama.Block.forward`)."""
        t, det = h.shape[0], deterministic
        qkv = project(self._ln(h, self.ln_1), self.attn.c_attn, det)  # (T, 3 * hidden)
        q, k, v = (z.reshape(t, self.num_heads, self.head_dim) for z in qkv.chunk(3, dim=-1))
        o = attend(self.layer_idx, q, k, v, self.scale)  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        h = h + project(o.reshape(o.shape[0], -1), self.attn.c_proj, det)
        m = elementwise(self.act, project(self._ln(h, self.ln_2), self.mlp.c_fc, det), det)
        return h + project(m, self.mlp.c_proj, det)


class GPT2LM(DecoderLM):
    """GPT-2 causal LM (tied lm_head), or its bare backbone (`lm_head=False`)."""

    def __init__(self, config, *, lm_head: bool = True):
        args = GPT2Args.from_config(config)
        super().__init__(config, args)
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.pos_embed = nn.Embedding(args.max_context, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        if lm_head:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.lm_head.weight = self.embed.weight

    def embed_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor):
        emb = self.embed
        return F.embedding(input_ids, emb.weight, emb.padding_idx) + self.pos_embed.weight[positions], None

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (h.shape[-1],), self.norm.weight, self.norm.bias, self.args.norm_eps)
