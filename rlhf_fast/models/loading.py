"""Loading and saving models and tokenizers in local Hugging Face directories, with errors that say what is wrong.

`load_model` / `save_model` are the stages' way in and out: rlhf_fast's own models (`models.DecoderLM`, the scalar
head models of `rlhf_fast.heads`) from and to safetensors, no transformers module in the loop. rlhf_fast never
downloads: a name that is not a local directory is an error at once (no hub retries).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the path and the reason."""


class UnsupportedModelError(ModelLoadError):
    """A model architecture (or an option of one) that rlhf_fast's models do not cover; the message says which."""


def local_dir(path: str | Path, what: str) -> str:
    """`path` as a string if it is a local model directory; else a ModelLoadError saying why not."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.exists():
        raise ModelLoadError(f"{what}: {path} is a file, not a model directory")
    raise ModelLoadError(f"{what}: {path}: no such directory (models load from local directories only; Hugging "
                         f"Face hub downloads are off, so download it first and pass the directory)")


def _offline(fn, path: str, what: str, **kw):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return fn(path, local_files_only=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{what}: cannot load {path}: {first}") from e


def read_config(path: str | Path, what: str) -> dict:
    """`path/config.json` of local model directory `path` as a dict; ModelLoadError when there is none or it is not
    JSON."""
    cfg = Path(local_dir(path, what)) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: {cfg} is not readable JSON ({e})") from e


def check_family(path: str | Path, what: str) -> None:
    """An UnsupportedModelError (one line, naming the covered families) when the model in directory `path` is of a
    family rlhf_fast's models do not cover, told from its config.json alone: nothing else is read."""
    from rlhf_fast.models import _FAMILIES, covered_families

    cfg = read_config(path, what)
    model_type = cfg.get("model_type")
    if model_type in _FAMILIES:
        return
    arch = ", ".join(cfg.get("architectures") or []) or f"model_type {model_type!r}"
    raise UnsupportedModelError(f"{what}: {path} is a {arch} (model_type {model_type!r}); rlhf_fast's models are "
                                f"{', '.join(covered_families())} (and their backbones)")


def load_model(path: str | Path, what: str = "model", *, dtype: torch.dtype | None = torch.float32,
               backbone: bool = False, device: str | torch.device = "cpu"):
    """rlhf_fast's model (a `models.DecoderLM`) from local Hugging Face model directory `path`: its causal LM, or with
    `backbone` its bare backbone (no lm_head: reward and value models). The family is checked from config.json
    before any weight is read (`check_family`); the weights load straight from safetensors
    (`state_dict_adapter.load_pretrained`) in `dtype` (None: the checkpoint's) on `device`. Errors are one-line
    ModelLoadErrors that start with `what`."""
    from rlhf_fast.models.state_dict_adapter import load_pretrained

    check_family(path, what)
    try:
        return load_pretrained(path, dtype=dtype, device=device, backbone=backbone)
    except ModelLoadError as e:
        raise type(e)(f"{what}: {str(e).removeprefix('model: ')}") from e


def save_model(model, path: str | Path, *, tokenizer=None, dtype: torch.dtype | None = None,
               base_dir: str | Path | None = None) -> None:
    """Export `model` as a Hugging Face directory at `path`: a `DecoderLM` (a causal LM directory), a
    `heads.ScalarHeadModel` (the backbone + `scalar_head.safetensors`), either with LoRA adapters (the merged model
    plus `adapter/` in peft's format, `base_model_name_or_path` = `base_dir`: `models.lora.export`), sharded with
    FSDP2 or not. Weights in `dtype` (None: the model's; a scalar head keeps its own), `tokenizer`'s files beside
    them. Every rank calls it; rank 0 writes."""
    from rlhf_fast.models import lora
    from rlhf_fast.models.state_dict_adapter import save_pretrained

    if lora.has_adapters(model):
        lora.export(model, path, dtype=dtype, base_dir=base_dir, tokenizer=tokenizer)
    elif hasattr(model, "head") and hasattr(model, "lm"):
        model.save_pretrained(path, dtype=dtype, tokenizer=tokenizer)
    else:
        save_pretrained(model, path, tokenizer=tokenizer, dtype=dtype)


def load_causal_lm(path: str | Path, what: str = "model", dtype: torch.dtype = torch.float32):
    """A transformers causal LM from local directory `path`: the test oracle and benchmark baseline only (the
    stages train rlhf_fast's own models, `load_model`)."""
    from transformers import AutoModelForCausalLM

    path = local_dir(path, what)
    read_config(path, what)
    return _offline(AutoModelForCausalLM.from_pretrained, path, what, dtype=dtype)


def load_backbone(path: str | Path, what: str = "model", dtype: torch.dtype = torch.float32):
    """A transformers backbone (`AutoModel`: no lm_head) from local directory `path` (test oracle only)."""
    from transformers import AutoModel

    path = local_dir(path, what)
    read_config(path, what)
    return _offline(AutoModel.from_pretrained, path, what, dtype=dtype)


def load_tokenizer(path: str | Path, what: str = "tokenizer"):
    """A transformers tokenizer from local directory `path`."""
    from transformers import AutoTokenizer

    return _offline(AutoTokenizer.from_pretrained, local_dir(path, what), what)
