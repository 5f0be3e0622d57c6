"""Dtypes and memory options of a stage's models: the checkpoint's own dtype, saving back in it, gradient
checkpointing.

* `model_dtype` (auto = the dtype the checkpoint's config.json records, else float32) is the dtype PPO's frozen
  models (reference, reward model) are held in and the dtype every stage's outputs are saved in, so a bf16
  checkpoint comes back bf16. Trained weights stay fp32 (master weights) whatever the checkpoint's dtype.
* `mixed_precision`: bf16 autocast of the forward passes that train and of the passes PPO's ratio is measured
  against (the rollout engine runs as it is): auto = on a CUDA device with bf16, off elsewhere (bf16 autocast on
  the CPUs we test on is slower than fp32); bf16 = on (CPU too); no = off. Master weights and their gradients stay
  fp32; the final norm of Llama/Qwen2/GPT-2 returns fp32, so the fused log-prob ops see fp32 hidden states.
* Both keys take the same spellings, fp32/float32, bf16/bfloat16 and fp16/float16 (`model_dtype` only: autocast is
  bf16 only), and the config records one name for each (`rlhf_fast.config.DTYPE_NAMES`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the spellings config accepts


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype `model_dir/config.json` records (`dtype` or `torch_dtype`), float32 if none."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return torch.float32
    d = json.loads(cfg.read_text())
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def resolve_dtype(model_dtype: str, model_dir: str | Path | None) -> torch.dtype:
    """`model_dtype` as a torch dtype; auto = the checkpoint's (float32 for a model built from scratch)."""
    if model_dtype == "auto":
        return checkpoint_dtype(model_dir) if model_dir else torch.float32
    return DTYPES[model_dtype]


def autocast_on(mixed_precision: str, device: torch.device) -> bool:
    if mixed_precision in ("bf16", "bfloat16"):
        return True
    if mixed_precision in ("no", "fp32", "float32"):
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast on `device` when `mixed_precision` asks for it (see the module docstring), else nothing."""
    if autocast_on(mixed_precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_in_dtype(model, path: str | Path, dtype: torch.dtype) -> None:
    """`model.save_pretrained(path)` with its floating-point weights cast to `dtype` on the way out (the live
    weights are untouched; tied weights stay one tensor) and config.json recording `dtype`. A `ScalarHeadModel`
    saves its causal LM so and its scalar head as it is; a LoRA model exports itself (merged, + `adapter/`)."""
    if getattr(model, "peft", None) is not None:
        from rlhf_fast.models.lora import export

        export(model, path, dtype)
        return
    if hasattr(model, "lm") and hasattr(model, "head"):
        model.save_pretrained(path)  # the head file, and the LM in its live dtype, rewritten below
        model = model.lm
    elif next(model.parameters()).dtype == dtype:
        model.save_pretrained(str(path))
        return
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.dtype != dtype:
            v = cast.setdefault(v.data_ptr(), v.detach().to(dtype))
        state[k] = v
    model.save_pretrained(str(path), state_dict=state)
    cfg = Path(path) / "config.json"  # HF records the live weights' dtype; record the saved one
    d = json.loads(cfg.read_text())
    d["dtype"] = str(dtype).replace("torch.", "")
    d.pop("torch_dtype", None)
    cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward instead of storing them (HF's own
    `gradient_checkpointing_enable`, non-reentrant). `model` is a causal LM or a `ScalarHeadModel`."""
    lm = getattr(model, "lm", model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False


def is_checkpointing(model) -> bool:
    lm = getattr(model, "lm", model)
    if hasattr(lm, "is_activation_checkpointing"):  # transformers >= 5.x (the old name warns)
        return bool(lm.is_activation_checkpointing)
    return bool(getattr(lm, "is_gradient_checkpointing", False))
