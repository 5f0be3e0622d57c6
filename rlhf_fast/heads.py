"""Reward and value models: a causal LM's backbone with a scalar head.

Saved as the Hugging Face causal LM (loadable by `AutoModelForCausalLM.from_pretrained`, the unused lm_head
included) plus `scalar_head.safetensors` with the head's weight and bias.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf_fast.models.hidden import final_hidden, untied_output_weight

HEAD_FILE = "scalar_head.safetensors"


class ScalarHeadModel(nn.Module):
    """`lm`'s final hidden states through `Linear(hidden, 1)`: one scalar per token.

    As a reward model the score is the value at each sequence's last real token; as a value model every
    response position's value is used.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids (B, T)` -> values `(B, T)` fp32."""
        hidden = final_hidden(self.lm, input_ids, attention_mask)  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone and head, without the causal LM's own (unused) output projection."""
        unused = untied_output_weight(self.lm)
        return [p for p in self.parameters() if p.requires_grad and p is not unused]

    def score(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded `input_ids (B, T)`, `lengths (B,)` -> the value at each last real token, `(B,)`."""
        values = self(input_ids)  # (B, T)
        return values.gather(1, (lengths.to(values.device) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        self.lm.save_pretrained(str(path))
        save_file({"weight": self.head.weight.detach().contiguous(), "bias": self.head.bias.detach().contiguous()},
                  str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        """From a directory saved by `save_pretrained`, or from a plain causal LM (a freshly initialised head)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        model = cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype))
        head_file = Path(path) / HEAD_FILE
        if head_file.is_file():
            state = load_file(str(head_file))
            with torch.no_grad():
                model.head.weight.copy_(state["weight"])
                model.head.bias.copy_(state["bias"])
        return model
