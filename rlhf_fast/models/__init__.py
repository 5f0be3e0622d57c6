"""Compact packed-token models that run on a Hugging Face causal LM's own parameter tensors (no copy, no sync)."""
from __future__ import annotations

from rlhf_fast.models.gpt2 import GPT2LM
from rlhf_fast.models.hidden import disable_dropout, final_hidden, output_head
from rlhf_fast.models.layers import AttnMetadata
from rlhf_fast.models.llama import LlamaFamilyLM

_BY_CLASS = {
    "LlamaForCausalLM": LlamaFamilyLM,
    "Qwen2ForCausalLM": LlamaFamilyLM,
    "MistralForCausalLM": LlamaFamilyLM,
    "GPT2LMHeadModel": GPT2LM,
    "LlamaModel": LlamaFamilyLM,  # bare backbones (value and reward models): hidden states, no logits
    "Qwen2Model": LlamaFamilyLM,
    "MistralModel": LlamaFamilyLM,
    "GPT2Model": GPT2LM,
}


def supports_class(cls: type) -> bool:
    """Whether `bind_model` covers models of class `cls` (a transformers class or a subclass of one)."""
    return any(c.__name__ in _BY_CLASS and c.__module__.startswith("transformers.") for c in cls.__mro__)


def supports(hf_model) -> bool:
    """Whether `bind_model` covers `hf_model`'s architecture."""
    return supports_class(type(hf_model))


def covered_families() -> list[str]:
    """The causal-LM classes `bind_model` covers (their bare backbones too), for error messages."""
    return sorted(k for k in _BY_CLASS if k.endswith(("ForCausalLM", "LMHeadModel")))


def bind_model(hf_model):
    """The compact model for `hf_model` (a transformers causal LM or its bare backbone); it reads `hf_model`'s
    parameters at every call."""
    for cls in type(hf_model).__mro__:
        if cls.__name__ in _BY_CLASS and cls.__module__.startswith("transformers."):
            return _BY_CLASS[cls.__name__](hf_model)
    raise TypeError(f"unsupported model class {type(hf_model).__name__}: the rollout engine supports "
                    f"{', '.join(sorted(_BY_CLASS))}")


__all__ = ["AttnMetadata", "GPT2LM", "LlamaFamilyLM", "bind_model", "disable_dropout", "final_hidden", "output_head",
           "covered_families", "supports", "supports_class"]
