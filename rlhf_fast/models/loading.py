"""Loading Hugging Face models and tokenizers from local directories, with errors that say what is wrong.

rlhf_fast never downloads: a name that is not a local directory is an error at once (no hub retries).
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


def load_causal_lm(path: str | Path, what: str = "model", dtype: torch.dtype = torch.float32):
    """A transformers causal LM from local directory `path`; ModelLoadError if its logits are not
    `lm_head(final hidden state)` (soft-capping, logit scaling: `hidden.probe_head`)."""
    from transformers import AutoModelForCausalLM

    path = local_dir(path, what)
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json: not a Hugging Face model directory")
    model = _offline(AutoModelForCausalLM.from_pretrained, path, what, dtype=dtype)
    from rlhf_fast.models.hidden import probe_head

    probe_head(model, what)  # its logits must be lm_head(final hidden): else one line, never wrong log-probs
    return model


def load_backbone(path: str | Path, what: str = "model", dtype: torch.dtype = torch.float32):
    """A transformers backbone (`AutoModel`: no lm_head) from local directory `path`."""
    from transformers import AutoModel

    path = local_dir(path, what)
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json: not a Hugging Face model directory")
    return _offline(AutoModel.from_pretrained, path, what, dtype=dtype)


def load_tokenizer(path: str | Path, what: str = "tokenizer"):
    """A transformers tokenizer from local directory `path`."""
    from transformers import AutoTokenizer

    return _offline(AutoTokenizer.from_pretrained, local_dir(path, what), what)


def check_compact_support(path: str | Path, what: str, *, backbone: bool = False, needed_by: str = "this stage",
                          hint: str = "") -> None:
    """A ModelLoadError, from `path/config.json` alone (before any weight loads), when the model there is of an
    architecture rlhf_fast's models (`rlhf_fast.models.from_hf`: the rollout engine and the padding-free
    passes) do not cover; `needed_by` names what needs them, `hint` (", ...") what to do instead. `backbone`: the
    directory holds a bare backbone (a reward or value model). A directory whose class cannot be told from its
    config passes (loading it says what is wrong)."""
    import transformers
    from transformers.models.auto import modeling_auto

    from rlhf_fast.models import covered_families, supports_class

    cfg = Path(local_dir(path, what)) / "config.json"
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return
    names = modeling_auto.MODEL_MAPPING_NAMES if backbone else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = names.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        return
    if supports_class(cls):
        return
    families = covered_families()
    raise ModelLoadError(f"{what}: {path} is a {name} (model_type {model_type!r}); {needed_by} supports "
                         f"{', '.join(families)} (and their backbones){hint}")
