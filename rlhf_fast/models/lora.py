"""LoRA as the stages use it: adapters inside rlhf_fast's own models (a `DecoderLM`, or a scalar head model's
backbone), switched off for PPO's reference, exported merged plus in peft's format.

The adapter itself (`LoRALinear`: W x + b + (alpha / r) * B A dropout(x), keeping the base's `weight` / `bias`
names), its injection and peft's adapter format live in `models.lora_owned`; this module adds what a stage calls:

* `apply_lora(model, cfg, seed=)`: adapters on a `DecoderLM`, or on a `ScalarHeadModel`'s backbone with its scalar
  head left trainable; everything else frozen. Apply it before `parallelize` (FSDP2 shards the adapters with the
  rest);
* `adapters_disabled(model)`: the frozen base (a no-op without adapters); `has_adapters(model)`;
* `export(model, path, dtype=, base_dir=)`: the merged model (W + scaling * B A computed on the way out, the live
  weights untouched) as the plain directory the next stage loads (a causal LM, or a backbone +
  `scalar_head.safetensors`), plus the adapters in `path/adapter/` in peft's format, which
  `peft.PeftModel.from_pretrained(<HF base>, path/adapter)` loads (`base_model_name_or_path` = `base_dir`).

The resume checkpoint is the run's usual state dict (adapters and frozen base).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf_fast.models.lora_owned import (CONFIG_FILE, WEIGHTS_FILE, LoRALinear, adapter_parameters,
                                         adapter_state_dict, adapters_disabled, load_adapter, lora_modules,
                                         merged_state, merged_state_dict, projections, save_adapter, target_names)
from rlhf_fast.models.lora_owned import apply_lora as _apply_decoder

ADAPTER_DIR = "adapter"  # the adapters' peft directory inside an export


def _scalar_head(model: nn.Module) -> bool:
    return hasattr(model, "head") and hasattr(model, "lm")


def apply_lora(model: nn.Module, cfg, *, seed: int = 0) -> list[str]:
    """Adapters of rank `cfg.r` on `cfg.target_modules` of `model`, in place (`lora_owned.apply_lora`): a
    `DecoderLM`, or a `heads.ScalarHeadModel` (adapters in its backbone `.lm`; the scalar head stays trainable).
    Returns our names of the adapted projections (relative to the decoder)."""
    if not _scalar_head(model):
        return _apply_decoder(model, cfg, seed=seed)
    names = _apply_decoder(model.lm, cfg, seed=seed)
    model.head.requires_grad_(True)
    return names


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` holds LoRA adapters."""
    return bool(lora_modules(model))


def export(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
           base_dir: str | Path | None = None, tokenizer=None) -> None:
    """`model` (a `DecoderLM` or `ScalarHeadModel` with adapters, sharded or not) as a plain model directory at
    `path`, its adapters merged, weights in `dtype` (None: the model's; a scalar head stays as it is), `tokenizer`
    beside them; plus the adapters in `path/adapter/` in peft's format (`base_model_name_or_path` = `base_dir`).
    Every rank calls it (a sharded model is gathered); rank 0 writes."""
    from rlhf_fast.models.state_dict_adapter import save_pretrained

    merged = merged_state_dict(model)  # our names; rank 0 gets it, other ranks of a sharded model {}
    if _scalar_head(model):
        model.save_pretrained(path, dtype=dtype, tokenizer=tokenizer, state_dict=merged)
        save_adapter(model.lm, Path(path) / ADAPTER_DIR, base_dir=base_dir)
    else:
        save_pretrained(model, path, tokenizer=tokenizer, dtype=dtype, state_dict=merged)
        save_adapter(model, Path(path) / ADAPTER_DIR, base_dir=base_dir)


__all__ = ["ADAPTER_DIR", "CONFIG_FILE", "WEIGHTS_FILE", "LoRALinear", "adapter_parameters", "adapter_state_dict",
           "adapters_disabled", "apply_lora", "export", "has_adapters", "load_adapter", "lora_modules",
           "merged_state", "merged_state_dict", "projections", "save_adapter", "target_names"]
