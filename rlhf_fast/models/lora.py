"""LoRA adapters through `peft` for SFT: only the adapters train, the base weights stay frozen.

`LoRALM.wrap(model, cfg, base_dir)` injects peft's LoRA layers into the Hugging Face causal LM in place, so the
stage keeps running `wrapped.lm` (the same HF model, now with adapters). The resume checkpoint is the run's usual
state dict (adapters and frozen base); the final export (`export`) is the merged model (W + scale * B A, computed on
the way out; the live weights are not merged) as a plain HF model the next stage loads, plus the adapters in peft's
own format in `adapter/` (`adapter_config.json`, `adapter_model.safetensors`; `base_model_name_or_path` names the
base directory), which `LoRALM.from_pretrained` and `peft.PeftModel.from_pretrained` load.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ADAPTER_DIR = "adapter"


def _targets(spec: str):
    return "all-linear" if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


class LoRALM(nn.Module):
    """A causal LM `lm` with peft LoRA adapters injected; `peft` is peft's wrapper of it (not a submodule)."""

    def __init__(self, peft_model):
        super().__init__()
        self.lm = peft_model.get_base_model()
        object.__setattr__(self, "peft", peft_model)  # its parameters are lm's; keep it out of state_dict

    @classmethod
    def wrap(cls, model, cfg, base_dir: str | Path, *, seed: int = 0) -> LoRALM:
        """Adapters of rank `cfg.r` (scale `cfg.alpha / cfg.r`) on `cfg.target_modules`, everything else frozen;
        A is drawn from a generator seeded with `seed` (B starts at 0), so a run is reproducible."""
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=_targets(cfg.target_modules))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            pm = get_peft_model(model, lc)
        pm.peft_config[pm.active_adapter].base_model_name_or_path = str(base_dir)  # where from_pretrained finds it
        return cls(pm)

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

    @torch.no_grad()
    def merged_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The plain HF state dict of base + adapters (W + scale * B A) in `dtype`; tied weights stay one tensor."""
        from peft.tuners.lora import LoraLayer

        deltas = {f"{name}.weight": m.get_delta_weight(m.active_adapters[0])
                  for name, m in self.lm.named_modules() if isinstance(m, LoraLayer) and m.active_adapters}
        cast: dict[int, torch.Tensor] = {}
        out = {}
        for k, v in self.lm.state_dict().items():
            if ".lora_" in k:
                continue
            k = k.replace(".base_layer", "")
            if k in deltas:
                v = v + deltas[k]
            if v.is_floating_point():
                v = cast.setdefault(v.data_ptr(), v.to(dtype)) if k not in deltas else v.to(dtype)
            out[k] = v
        return out

    def export(self, path: str | Path, dtype: torch.dtype) -> None:
        """The merged model at `path` (loads with `AutoModelForCausalLM.from_pretrained`), adapters in `adapter/`."""
        import json

        self.lm.save_pretrained(str(path), state_dict=self.merged_state_dict(dtype))
        cfg = Path(path) / "config.json"
        d = json.loads(cfg.read_text())
        d["dtype"] = str(dtype).replace("torch.", "")
        cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        self.save_pretrained(Path(path) / ADAPTER_DIR)
