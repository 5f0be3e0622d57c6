"""A Hugging Face causal LM's training-side views: final hidden states (no logits), its output projection, and
dropout switched off."""
from __future__ import annotations

import torch
from torch import nn

from rlhf_fast import distributed


def final_hidden(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final (normed) hidden states `(B, T, H)` of right-padded `input_ids (B, T)`; the lm_head is not run.
    On a sharded model this runs under the root's FSDP hooks, so `output_head` can be read after it."""
    dev = hf_model.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)

    def run(ids, mask):
        return hf_model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    return distributed.root_call(hf_model, run, input_ids.to(dev), attention_mask)


def output_head(hf_model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias (or None)."""
    head = hf_model.get_output_embeddings()
    return head.weight, head.bias


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of `model` set to 0 (`nn.Dropout` modules and the attention-probability dropout that
    attention modules keep as a float), so train-mode forwards equal eval-mode ones. Returns `model`."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model
