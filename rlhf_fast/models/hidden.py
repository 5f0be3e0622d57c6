"""Dropout switched off in a model (ours, or a transformers model a test compares against)."""
from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of `model` set to 0 (`nn.Dropout` modules, LoRA's included, and the attention-probability
    dropout that transformers' attention modules keep as a float), so train-mode forwards equal eval-mode ones.
    Returns `model`."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model
