"""A Hugging Face causal LM's training-side views: final hidden states (no logits) and its output projection."""
from __future__ import annotations

import torch


def final_hidden(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final (normed) hidden states `(B, T, H)` of right-padded `input_ids (B, T)`; the lm_head is not run."""
    dev = hf_model.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)
    return hf_model.base_model(input_ids=input_ids.to(dev), attention_mask=attention_mask,
                               use_cache=False).last_hidden_state


def output_head(hf_model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias (or None)."""
    head = hf_model.get_output_embeddings()
    return head.weight, head.bias

