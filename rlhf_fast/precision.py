"""Dtypes of a stage's models: the checkpoint's own dtype (the one outputs are saved in) and bf16 autocast.

* `model_dtype` (auto = the dtype the checkpoint's config.json records, else float32) is the dtype PPO's frozen
  models (reference, reward model) are held in and the dtype every stage's outputs are saved in
  (`models.save_model(..., dtype=)`), so a bf16 checkpoint comes back bf16. Trained weights stay fp32 (master
  weights) whatever the checkpoint's dtype.
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
