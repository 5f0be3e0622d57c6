"""LoRA adapters through `peft` in every stage: only the adapters (and a scalar head) train, the base stays frozen.

`inject(module, cfg, base_dir)` puts peft's LoRA layers into a Hugging Face causal LM or backbone in place, so a
stage keeps running the same module:
  * SFT and the PPO policy: `LoRALM.wrap(causal_lm, ...)`; the stage runs `wrapped.lm` (the same HF model, now
    with adapters);
  * the RM and PPO's value model: `add_to_scalar_head(model, ...)` on a `heads.ScalarHeadModel` (the adapters go
    into its backbone; the head stays trainable).
The compact models (`rlhf_fast.models.layers.project`) apply the adapters as peft's forward does, so the rollout
engine and the padding-free training forwards read base + adapter without a merged copy; `adapters_disabled`
switches them off (PPO's reference is the policy's base so). `check_supported` refuses what they do not apply.

The resume checkpoint is the run's usual state dict (adapters and frozen base). The final export (`export`) is the
merged model (W + scale * B A, computed on the way out; the live weights are not merged) as the plain directory the
next stage loads (a causal LM, or a backbone + `scalar_head.safetensors`), plus the adapters in peft's own format in
`adapter/` (`adapter_config.json`, `adapter_model.safetensors`; `base_model_name_or_path` names the base directory),
which `LoRALM.from_pretrained` and `peft.PeftModel.from_pretrained` load.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.config import ConfigError

ADAPTER_DIR = "adapter"


def _targets(spec: str):
    return "all-linear" if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def inject(module: nn.Module, cfg, base_dir: str | Path, *, seed: int = 0):
    """peft LoRA layers of rank `cfg.r` (scale `cfg.alpha / cfg.r`) on `cfg.target_modules` of `module`, in place,
    with every other parameter of `module` frozen; returns peft's wrapper (`PeftModel`, for saving). A is drawn
    from a generator seeded with `seed` (B starts at 0, so the adapted model starts equal to the base)."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                    target_modules=_targets(cfg.target_modules))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            pm = get_peft_model(module, lc)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model ..."
            raise ConfigError(f"lora.target_modules: {cfg.target_modules!r} matches no layer peft can adapt "
                              f"({str(e).strip().splitlines()[0][:300]}); this model's linear layers are named "
                              f"{', '.join(linear_names(module))}, or use all-linear") from e
    pm.peft_config[pm.active_adapter].base_model_name_or_path = str(base_dir)  # where from_pretrained finds it
    check_supported(pm.get_base_model())
    return pm


def linear_names(module: nn.Module) -> list[str]:
    """The distinct last names of `module`'s linear layers (`nn.Linear`, GPT-2's `Conv1D`) but the output head:
    what `lora.target_modules` may name."""
    from transformers.pytorch_utils import Conv1D

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and m is not head and n})


def _is_lora(m: nn.Module) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "get_base_layer")  # peft's LoraLayer (peft imported lazily)


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers in `module` (none for a plain model)."""
    return [m for m in module.modules() if _is_lora(m)]


def check_supported(lm: nn.Module) -> None:
    """A ConfigError unless every adapter of `lm` is plain LoRA on a decoder projection (`nn.Linear` or GPT-2's
    `Conv1D`), the only kind `layers.project` applies: not on the embeddings or the output head, no DoRA."""
    from transformers.pytorch_utils import Conv1D

    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    for name, m in lm.named_modules():
        if not _is_lora(m):
            continue
        base = m.get_base_layer()
        if head in (m, base) or not isinstance(base, (nn.Linear, Conv1D)) or getattr(m, "lora_variant", None):
            raise ConfigError(f"lora.target_modules: {name} ({type(base).__name__}) is not a decoder projection; "
                              f"LoRA goes on the attention and MLP linears only (the default all-linear)")


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with its LoRA adapters switched off (peft's own switch, as `PeftModel.disable_adapter()`), so it
    runs as its frozen base; a no-op for a model without adapters. Yields `module`."""
    layers = adapter_layers(module)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield module
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.no_grad()
def merged_state_dict(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain HF state dict of `module`'s base + adapters (W + scale * B A) in `dtype`; tied weights stay one
    tensor."""
    deltas = {f"{name}.weight": m.get_delta_weight(m.active_adapters[0])
              for name, m in module.named_modules() if _is_lora(m) and m.active_adapters}
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in module.state_dict().items():
        if ".lora_" in k:
            continue
        k = k.replace(".base_layer", "")
        if k in deltas:
            v = v + deltas[k]
        if v.is_floating_point():
            v = cast.setdefault(v.data_ptr(), v.to(dtype)) if k not in deltas else v.to(dtype)
        out[k] = v
    return out


def export(model: nn.Module, path: str | Path, dtype: torch.dtype) -> None:
    """A `LoRALM` or a `ScalarHeadModel` with adapters (`model.peft`) as a plain model directory at `path`, its
    weights merged, in `dtype` (a scalar head stays as it is), plus the adapters in `path/adapter/`."""
    path = Path(path)
    model.lm.save_pretrained(str(path), state_dict=merged_state_dict(model.lm, dtype))
    if hasattr(model, "save_head"):
        model.save_head(path)
    cfg = path / "config.json"
    d = json.loads(cfg.read_text())
    d["dtype"] = str(dtype).replace("torch.", "")
    d.pop("torch_dtype", None)
    cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    model.peft.save_pretrained(str(path / ADAPTER_DIR))


def add_to_scalar_head(model: nn.Module, cfg, base_dir: str | Path, *, seed: int = 0) -> nn.Module:
    """Adapters in a `ScalarHeadModel`'s backbone (its head stays trainable); `model.peft` keeps peft's wrapper
    (not a submodule: its parameters are the backbone's). Returns `model`."""
    object.__setattr__(model, "peft", inject(model.lm, cfg, base_dir, seed=seed))
    return model


class LoRALM(nn.Module):
    """A causal LM `lm` with peft LoRA adapters injected; `peft` is peft's wrapper of it (not a submodule)."""

    def __init__(self, peft_model):
        super().__init__()
        self.lm = peft_model.get_base_model()
        object.__setattr__(self, "peft", peft_model)  # its parameters are lm's; keep it out of state_dict

    @classmethod
    def wrap(cls, model, cfg, base_dir: str | Path, *, seed: int = 0) -> LoRALM:
        """`model` with adapters (`inject`); everything else frozen."""
        return cls(inject(model, cfg, base_dir, seed=seed))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, path: str | Path) -> None:
        self.peft.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> LoRALM:
        """The base model named in the adapter config, with the adapters of `path` (trainable)."""
        from peft import PeftConfig, PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(str(path)).base_model_name_or_path,
                                                    dtype=dtype)
        return cls(PeftModel.from_pretrained(base, str(path), is_trainable=True))

    def merged_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return merged_state_dict(self.lm, dtype)

    def export(self, path: str | Path, dtype: torch.dtype) -> None:
        """The merged model at `path` (loads with `AutoModelForCausalLM.from_pretrained`), adapters in `adapter/`."""
        export(self, path, dtype)


def refuse_sharded() -> None:
    """LoRA is single-process for now: a ConfigError under torchrun (the sharded path does not wrap adapters)."""
    from rlhf_fast import distributed

    if distributed.world_size() > 1:
        raise ConfigError("lora.r: LoRA runs in one process for now (the sharded path does not wrap adapters)")
