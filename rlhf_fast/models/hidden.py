"""A Hugging Face causal LM's training-side views: final hidden states (no logits) and its output projection."""
from __future__ import annotations

import torch

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

