"""Mixtral and Qwen3-MoE: Llama's decoder (`models.llama`) with mixture-of-experts MLPs (`models.moe`).

They differ in their config only:
  * Mixtral: every layer's MLP is an MoE; the top-k weights are always renormalised, and stay fp32 when they scale
    the experts' outputs; a sliding window (`sliding_window`) on every layer.
  * Qwen3-MoE: q/k RMSNorm per head (as Qwen3); top-k weights renormalised only with `norm_topk_prob`, cast to the
    model's dtype; layer i is an MoE unless i is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0 (a
    dense SwiGLU MLP of `intermediate_size` then); a window on every layer with `use_sliding_window`.
Mixtral's `router_jitter_noise` (transformers applies it in training mode only) is not applied: routing is the
router's, so that a replayed rollout equals its record.

Module names are Llama's, an MoE layer's MLP being `layers.{i}.mlp.router` (weight (E, hidden)) and
`layers.{i}.mlp.experts` (`gate_up_proj` (E, 2F, hidden), `down_proj` (E, hidden, F)), as transformers holds them
in memory (`HF_MODULES`). Checkpoints store each expert's projections apart (`HF_CHECKPOINT`: what transformers'
`save_pretrained` writes), which the state-dict adapter stacks on load and splits on export.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rlhf_fast.models import llama
from rlhf_fast.models.layers import DecoderLM, RMSNorm, Rope, project, rms_norm
from rlhf_fast.models.moe import RoutingRecord, SparseMoE

MODEL_TYPES = ("mixtral", "qwen3_moe")
HF_PREFIX = llama.HF_PREFIX
HF_MODULES = {  # our module name -> transformers' in-memory one, relative to the backbone
    **llama.HF_MODULES,  # attention (Qwen3-MoE's q/k norms), norms, a dense layer's MLP
    "layers.{i}.mlp.router": "layers.{i}.mlp.gate",
    "layers.{i}.mlp.experts": "layers.{i}.mlp.experts",
}
HF_LAYERS = llama.HF_LAYERS
TRANSPOSED = llama.TRANSPOSED
HF_CHECKPOINT = {  # model_type -> {our parameter: its checkpoint keys, relative to the backbone}: our parameter is
    # the keys' tensors concatenated by rows in this order, and stacked over the experts {e} where the keys have one
    "mixtral": {
        "layers.{i}.mlp.router.weight": ("layers.{i}.block_sparse_moe.gate.weight",),
        "layers.{i}.mlp.experts.gate_up_proj": ("layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                                                "layers.{i}.block_sparse_moe.experts.{e}.w3.weight"),
        "layers.{i}.mlp.experts.down_proj": ("layers.{i}.block_sparse_moe.experts.{e}.w2.weight",),
    },
    "qwen3_moe": {
        "layers.{i}.mlp.experts.gate_up_proj": ("layers.{i}.mlp.experts.{e}.gate_proj.weight",
                                                "layers.{i}.mlp.experts.{e}.up_proj.weight"),
        "layers.{i}.mlp.experts.down_proj": ("layers.{i}.mlp.experts.{e}.down_proj.weight",),
    },
}


@dataclasses.dataclass(frozen=True)
class MoeArgs(llama.LlamaArgs):
    num_experts: int = 0
    top_k: int = 0                       # num_experts_per_tok
    expert_size: int = 0                 # each expert's inner width F (Qwen3-MoE's moe_intermediate_size)
    sparse: tuple[bool, ...] = ()        # per layer: an MoE MLP (else a dense one of intermediate_size)
    renormalise: bool = True             # top-k weights divided by their sum (Qwen3-MoE: norm_topk_prob)
    weights_in_model_dtype: bool = False  # top-k weights cast to the model's dtype before scaling (Qwen3-MoE)

    def __post_init__(self):
        super().__post_init__()
        if len(self.sparse) != self.num_layers:
            raise ValueError(f"sparse has {len(self.sparse)} entries for {self.num_layers} layers")
        if any(self.sparse) and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")

    @classmethod
    def from_config(cls, cfg) -> MoeArgs:
        """The args of a `MixtralConfig` or `Qwen3MoeConfig`."""
        base = llama.LlamaArgs.from_config(cfg)
        n, qwen = cfg.num_hidden_layers, cfg.model_type == "qwen3_moe"
        if qwen:
            skip, step = set(cfg.mlp_only_layers or ()), cfg.decoder_sparse_step
            sparse = tuple(i not in skip and cfg.num_experts > 0 and (i + 1) % step == 0 for i in range(n))
            experts, inner = cfg.num_experts, cfg.moe_intermediate_size
        else:
            sparse, experts, inner = (True,) * n, cfg.num_local_experts, cfg.intermediate_size
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.LlamaArgs)}
        fields.update(windows=(getattr(cfg, "sliding_window", None) or 0,) * n, qk_norm=qwen)
        return cls(**fields, num_experts=experts, top_k=cfg.num_experts_per_tok, expert_size=inner, sparse=sparse,
                   renormalise=bool(cfg.norm_topk_prob) if qwen else True, weights_in_model_dtype=qwen)


class Block(llama.Block):
    """A decoder layer: Llama's attention, then an MoE MLP (`moe.SparseMoE`) or, on a dense layer, Llama's."""

    def __init__(self, a: MoeArgs, layer_idx: int):
        super().__init__(a, layer_idx)
        self.sparse = a.sparse[layer_idx]
        if self.sparse:
            self.mlp = SparseMoE(a.hidden_size, a.expert_size, a.num_experts, a.top_k, self.act,
                                 moe_index=sum(a.sparse[:layer_idx]), renormalise=a.renormalise,
                                 weights_in_model_dtype=a.weights_in_model_dtype)

    def forward(self, h: torch.Tensor, ctx, attend, deterministic: bool, rows: torch.Tensor | None = None,
                routing: RoutingRecord | None = None) -> torch.Tensor:
        """As `llama.Block.forward`; `routing`: the MoE MLP records or replays its experts there (`moe`)."""
        cos, sin = ctx
        t, det, att = h.shape[0], deterministic, self.attn
        x = rms_norm(h, self.attn_norm.weight, self.eps)
        q, k, v = llama.qkv(att, x, self.num_heads, self.num_kv_heads, self.head_dim, det)
        if self.qk_norm:  # Qwen3-MoE: per head, over head_dim
            q, k = rms_norm(q, att.q_norm.weight, self.eps), rms_norm(k, att.k_norm.weight, self.eps)
        q, k = llama.rotate(q, cos, sin, self.rotary_dim), llama.rotate(k, cos, sin, self.rotary_dim)
        o = attend(self.layer_idx, q, k, v, self.scale, window=self.window)  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        h = h + project(o.reshape(o.shape[0], -1), att.o_proj, det)
        x = rms_norm(h, self.mlp_norm.weight, self.eps)
        if self.sparse:
            return h + self.mlp(x, det, routing, rows, t)
        return h + llama.gated_mlp(self.mlp, x, self.act, det)


class MixtralLM(llama.LlamaLM):
    """Mixtral / Qwen3-MoE causal LM, or its bare backbone (`lm_head=False`). `moe_layers`: the indices of the
    layers whose MLP is an MoE, in the order of a `RoutingRecord`'s entries."""

    routed = True

    def __init__(self, config, *, lm_head: bool = True):
        args = MoeArgs.from_config(config)
        DecoderLM.__init__(self, config, args)
        self.rope = Rope(*llama.rope_parameters(config), args.max_context)  # a plain object: not in the state dict
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, args.pad_token_id)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.moe_layers = [i for i, s in enumerate(args.sparse) if s]
        if lm_head:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.lm_head.weight = self.embed.weight

