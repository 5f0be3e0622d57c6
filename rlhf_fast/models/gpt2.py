"""GPT-2 as a compact packed-token model bound to `GPT2LMHeadModel`'s own parameters (read at every call)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from rlhf_fast.models.layers import AttnMetadata, BoundLM, cache_attention, elementwise, project


class GPT2LM(BoundLM):
    """Decoder of `GPT2LMHeadModel` (or a bare `GPT2Model`) over packed tokens (learned positions, LayerNorm, Conv1D projections)."""

    def __init__(self, hf_model):
        cfg = hf_model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported by the rollout engine")
        self.hf = hf_model
        self.inner = hf_model.base_model  # GPT2Model; `hf_model` itself for a bare backbone
        self.num_layers = cfg.n_layer
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.vocab_size = cfg.vocab_size
        self.eps = cfg.layer_norm_epsilon
        self.act = ACT2FN[cfg.activation_function]
        self.max_context = cfg.n_positions
        base = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        by_layer = getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        self.scales = [base / (i + 1) if by_layer else base for i in range(self.num_layers)]

    def _ln(self, x: torch.Tensor, ln) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, self.eps)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        tr = self.inner
        return F.embedding(input_ids, tr.wte.weight, tr.wte.padding_idx) + tr.wpe.weight[positions], None  # (T, hidden)

    def layer_module(self, i: int) -> torch.nn.Module:
        return self.inner.h[i]

    def layer(self, i: int, h: torch.Tensor, ctx, attend, det: bool,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        t = h.shape[0]
        block = self.inner.h[i]
        att = block.attn
        qkv = project(self._ln(h, block.ln_1), att.c_attn, det)  # (T, 3 * hidden)
        q, k, v = (z.reshape(t, self.num_heads, self.head_dim) for z in qkv.chunk(3, dim=-1))
        o = attend(i, q, k, v, self.scales[i])  # (T, H, D)
        if rows is not None:  # only these rows are read: the rest of the layer runs on them alone
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        h = h + project(o.reshape(o.shape[0], -1), att.c_proj, det)
        mlp = block.mlp
        m = elementwise(self.act, project(self._ln(h, block.ln_2), mlp.c_fc, det), det)
        return h + project(m, mlp.c_proj, det)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self._ln(h, self.inner.ln_f)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_cache: torch.Tensor | None, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """Same contract as `LlamaFamilyLM.forward`: logits (R, vocab) float32."""
        h = self.decode(input_ids, positions, cache_attention(meta, kv_cache), meta.deterministic,
                        out_rows=logit_rows)  # prefill: the last layer's MLP on the rows that sample only
        return self.logits(self.final_norm(h), meta.deterministic)
