"""Dtypes and memory options of a stage's models: the checkpoint's own dtype, fp32 master weights for what trains,
bf16 autocast where the device supports it, saving back in the checkpoint's dtype, gradient checkpointing.

* `model_dtype` (auto = the dtype the checkpoint's config.json records, else float32): the dtype frozen models
  (PPO's reference and reward model) are held in, and the dtype every output is saved in.
* Trained weights are fp32 masters while `mixed_precision` is on (bf16 autocast for the forward); with it off they
  train in `model_dtype`.
* `mixed_precision`: auto = bf16 autocast on a CUDA device that supports bf16, off elsewhere (CPU bf16 autocast is
  slower than fp32 on the CPUs we test on); bf16 forces it (CPU too); no turns it off.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_DTYPES = ("auto", *DTYPES)
MIXED = ("auto", "bf16", "no")


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
    if mixed_precision == "bf16":
        return True
    if mixed_precision == "no":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def train_dtype(model_dtype: torch.dtype, mixed: bool) -> torch.dtype:
    """The dtype of trained weights: fp32 masters under autocast, else the model's own dtype."""
    return torch.float32 if mixed else model_dtype


def autocast(mixed: bool, device: torch.device):
    """bf16 autocast for a forward pass when `mixed`, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()


def like(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`weight` in `hidden`'s dtype (a differentiable cast: the fp32 master gets the gradient), for the fused ops,
    which take both in one dtype."""
    return weight if weight is None or weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def save_in_dtype(model, path: str | Path, dtype: torch.dtype) -> None:
    """`model.save_pretrained(path)` with its floating-point weights cast to `dtype` on the way out (the live
    weights are untouched; tied weights stay one tensor) and config.json recording `dtype`."""
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
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
