"""Hugging Face checkpoints in and out of rlhf_fast's own models, with no transformers module in the loop.

Names: each family's model file gives its HF module names (`HF_PREFIX`, `HF_MODULES`, `HF_LAYERS`, `TRANSPOSED`);
`to_hf_name` / `from_hf_name` map a state-dict key between the two. GPT-2's Conv1D weights are stored (in, out)
by HF and are (out, in) in our nn.Linear: they are transposed on the way in and out. A family whose HF checkpoints
fuse projections that ours keep apart (Phi-3's `qkv_proj`, `gate_up_proj`) lists them in `HF_SPLIT`: a fused
tensor is split by rows into our parts on load (`from_hf_names`) and the parts are concatenated back on export.

`load_pretrained` reads `config.json` and the safetensors (one file, or shards with `model.safetensors.index.json`)
one tensor at a time into a model built on the meta device, `load_state_dict(assign=True)`: the parameters are the
tensors safetensors returned (cast or transposed only where it must), never a second full copy.
`save_pretrained` writes an HF directory (config, generation config, safetensors sharded above a size, tokenizer)
that `AutoModelForCausalLM` / `AutoModel.from_pretrained` load with the same tensors; tied weights are stored once,
under HF's name.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rlhf_fast.models import stacked
from rlhf_fast.models.loading import ModelLoadError, UnsupportedModelError, _offline, local_dir

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")  # wrappers' key segments


@dataclass(frozen=True)
class Names:
    """One family's name tables, from its model file (`HF_PREFIX`, `HF_MODULES`, `HF_LAYERS`, `TRANSPOSED`):
    our module name <-> HF's relative to the backbone, with `{i}` standing for a block index."""
    prefix: str  # of a causal LM's backbone keys ("model."); a bare backbone checkpoint has none
    ours_to_hf: dict[str, str]  # "layers.{i}.attn.q_proj" -> "layers.{i}.self_attn.q_proj"
    hf_to_ours: dict[str, str]
    hf_layers: str  # HF's name of the block list ("layers", GPT-2's "h")
    transposed: frozenset[str]  # last module names whose HF weight is (in, out) (GPT-2's Conv1D)
    split: dict[str, tuple[str, ...]]  # our fused module -> its parts' (sibling) names in row order (`HF_SPLIT`)
    part_of: dict[str, tuple[str, int]]  # "layers.{i}.attn.k_proj" -> ("layers.{i}.attn.qkv_proj", 1)


_IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")  # buffers older checkpoints carry, not weights


def _kind(model_or_config) -> str | None:
    return getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)


@functools.lru_cache(maxsize=None)
def _names(kind: str | None) -> Names:
    from rlhf_fast import models

    fam = models._FAMILIES.get(kind)  # model_type -> the family's model file
    if fam is None:
        raise UnsupportedModelError(f"no state-dict mapping for model_type {kind!r}: rlhf_fast's models are "
                                    f"{', '.join(models.covered_families())} (and their backbones)")
    split = dict(getattr(fam, "HF_SPLIT", {}))
    part_of = {f"{fused.rpartition('.')[0]}.{part}": (fused, j) for fused, parts in split.items()
               for j, part in enumerate(parts)}
    return Names(prefix=f"{fam.HF_PREFIX}.", ours_to_hf=dict(fam.HF_MODULES),
                 hf_to_ours={v: k for k, v in fam.HF_MODULES.items()}, hf_layers=fam.HF_LAYERS,
                 transposed=frozenset(fam.TRANSPOSED), split=split, part_of=part_of)


def names(model_or_config) -> Names:
    """The `Names` of a model (anything with `.config`) or an HF config; UnsupportedModelError for other families."""
    return _names(_kind(model_or_config))


def _strip_wrappers(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _template(module: str, stack: str) -> tuple[str, str | None]:
    """(`module` with its block index as `{i}`, the index) for a module under `{stack}.{index}.`, else (module,
    None)."""
    head, _, rest = module.partition(".")
    if head == stack:
        idx, _, inner = rest.partition(".")
        if idx.isdigit():
            return f"{stack}.{{i}}.{inner}", idx
    return module, None


def _rename(module: str, table: dict[str, str], stack: str) -> str | None:
    """`module` through `table`, whose block entries read `{stack}.{i}.` (None when it has no entry)."""
    key, idx = _template(module, stack)
    target = table.get(key)
    return None if target is None else target.format(i=idx)


def to_hf_name(name: str, model_or_config, *, backbone: bool = False) -> str:
    """HF's key for our state-dict key `name` (`layers.0.attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.
    weight`); `backbone`: a bare backbone's key (no prefix). KeyError for a name outside the mapping. A part of a
    fused HF tensor (Phi-3's `layers.0.attn.k_proj.weight`) maps to the fused key (`model.layers.0.self_attn.
    qkv_proj.weight`), which holds it among its rows (`split_part`)."""
    tables = names(model_or_config)
    name = _strip_wrappers(name)
    if name.startswith("lm_head."):
        if backbone:
            raise KeyError(f"{name}: a bare backbone has no lm_head")
        return name
    module, _, leaf = name.rpartition(".")
    key, idx = _template(module, "layers")
    if key in tables.part_of:
        module = tables.part_of[key][0].format(i=idx)
    hf = _rename(module, tables.ours_to_hf, "layers")
    if hf is None:
        raise KeyError(f"{name}: not a weight of a {_kind(model_or_config)} model")
    return f"{'' if backbone else tables.prefix}{hf}.{leaf}"


def from_hf_name(hf_name: str, model_or_config) -> str | None:
    """Our key for HF key `hf_name`, from a causal LM (`model.`/`transformer.` prefix) or a bare backbone (none);
    None for a buffer that is not a weight (GPT-2's `attn.bias`, rotary `inv_freq`). KeyError for a key outside the
    mapping (a classification head, another family's name). A fused tensor (Phi-3's `qkv_proj`) gets the fused
    module's name, which a model `from_hf` converted holds; `from_hf_names` gives the parts a built model holds."""
    tables = names(model_or_config)
    if hf_name.startswith("lm_head."):
        return hf_name
    module, _, leaf = hf_name.removeprefix(tables.prefix).rpartition(".")
    ours = _rename(module, tables.hf_to_ours, tables.hf_layers)
    if ours is not None:
        return f"{ours}.{leaf}"
    if any(hf_name == s or hf_name.endswith("." + s) for s in _IGNORED):
        return None
    raise KeyError(f"{hf_name}: not a weight of a {_kind(model_or_config)} model")


def from_hf_names(hf_name: str, model_or_config) -> list[str]:
    """Our keys holding HF tensor `hf_name` in a model `build_model` made, in the order of their rows: one key, the
    parts of a fused tensor (`HF_SPLIT`: `model.layers.0.self_attn.qkv_proj.weight` -> `layers.0.attn.{q,k,v}_proj.
    weight`), or none for a buffer. KeyError as `from_hf_name`."""
    ours = from_hf_name(hf_name, model_or_config)
    if ours is None:
        return []
    module, _, leaf = ours.rpartition(".")
    key, _ = _template(module, "layers")
    parts = names(model_or_config).split.get(key)
    if parts is None:
        return [ours]
    parent = module.rpartition(".")[0]
    return [f"{parent}.{part}.{leaf}" for part in parts]


def split_part(name: str, model_or_config) -> tuple[int, int] | None:
    """(index, number of parts) of our key `name` among the parts of a fused HF tensor, or None when HF stores it
    alone."""
    tables = names(model_or_config)
    module = _strip_wrappers(name).rpartition(".")[0]
    key, _ = _template(module, "layers")
    if key not in tables.part_of:
        return None
    fused, j = tables.part_of[key]
    return j, len(tables.split[fused])


def split_siblings(module: str, model_or_config) -> list[str] | None:
    """Our module names of the parts of a fused HF module, in row order: of `module` itself when it is one (a
    converted model's `layers.0.attn.qkv_proj`), or of the one our `module` is a part of (`layers.0.attn.k_proj`);
    either gives `layers.0.attn.{q,k,v}_proj`. None when HF stores `module` alone."""
    tables = names(model_or_config)
    module = _strip_wrappers(module)
    key, _ = _template(module, "layers")
    parent = module.rpartition(".")[0]
    if key in tables.split:
        return [f"{parent}.{part}" for part in tables.split[key]]
    if key in tables.part_of:
        return [f"{parent}.{part}" for part in tables.split[tables.part_of[key][0]]]
    return None


def is_transposed(name: str, model_or_config) -> bool:
    """Whether our key `name` is stored transposed by HF (GPT-2's Conv1D weights: (in, out) there, (out, in) here)."""
    module, _, leaf = _strip_wrappers(name).rpartition(".")
    return leaf == "weight" and module.startswith("layers.") and \
        module.rpartition(".")[2] in names(model_or_config).transposed


# ----------------------------------------------------------------------------------------------------- loading

def _as_dtype(value) -> torch.dtype | None:
    """A torch dtype from a config's `dtype` (a torch.dtype or a name such as "bfloat16"), else None."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_files(path: str | Path) -> dict[str, list[str]]:
    """{safetensors file: the HF keys it holds} of model directory `path` (`model.safetensors`, or the shards that
    `model.safetensors.index.json` names); ModelLoadError when there are none (a `.bin`-only checkpoint included)."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"model: {path / INDEX} is not a safetensors index ({e})") from e
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(str(path / name), []).append(key)
        for f in files:
            if not Path(f).is_file():
                raise ModelLoadError(f"model: {path / INDEX} names {Path(f).name}, which is missing from {path}")
        return files
    if (path / SINGLE).is_file():
        try:
            with safe_open(str(path / SINGLE), framework="pt") as f:
                return {str(path / SINGLE): list(f.keys())}
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"model: cannot read {path / SINGLE}: {e}") from e
    if any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"model: {path} holds only pytorch_model*.bin weights; rlhf_fast reads safetensors: "
                             f"re-save it with transformers (`save_pretrained(dir)` writes safetensors)")
    raise ModelLoadError(f"model: {path} has no {SINGLE} or {INDEX}")


def _plan(files: dict[str, list[str]], config, backbone: bool) -> dict[str, tuple[str, str]]:
    """{our key: (file, HF key)} for every weight in the checkpoint the model will hold (the parts of a fused HF
    tensor share its entry, in the order of their rows)."""
    plan: dict[str, tuple[str, str]] = {}
    for file, keys in files.items():
        for key in keys:
            if stacked.piece(key, config) is not None:
                continue  # a piece of a stacked parameter (an expert's projection): `stacked.plan`
            try:
                ours_keys = from_hf_names(key, config)
            except KeyError:
                raise ModelLoadError(f"model: unexpected tensor {key!r} in {file}: not a weight of a "
                                     f"{config.model_type} model") from None
            for ours in ours_keys:
                if backbone and ours.startswith("lm_head."):
                    continue  # the head of a causal LM loaded as a backbone
                if ours in plan:
                    raise ModelLoadError(f"model: tensor {ours!r} twice in {Path(file).parent} ({plan[ours][1]!r} "
                                         f"and {key!r}: a causal LM's and a backbone's names mixed)")
                plan[ours] = (file, key)
    return plan


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def load_pretrained(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    backbone: bool = False):
    """Our model (a DecoderLM) from HF model directory `path`: its causal LM, or with `backbone` its bare backbone
    (no lm_head; a causal LM's lm_head is dropped). Reads `config.json` (local files only) and the safetensors into
    a meta-built model with `load_state_dict(assign=True, strict=True)`: no second copy. `dtype` None = the
    checkpoint's (config `dtype`, else the tensors'). A tied lm_head is `embed.weight` itself (also for a backbone
    checkpoint loaded as a causal LM). Errors: ModelLoadError naming the path and the tensor."""
    from transformers import AutoConfig

    from rlhf_fast.models import build_model

    path = local_dir(path, "model")
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"model: {path} has no config.json: not a Hugging Face model directory")
    config = _offline(AutoConfig.from_pretrained, path, "model")
    names(config)  # a clear error for a family we cannot map, before any tensor is read
    files = checkpoint_files(path)
    plan, pieces = _plan(files, config, backbone), stacked.plan(files, config)
    twice = plan.keys() & pieces.keys()
    if twice:
        ours = sorted(twice)[0]
        raise ModelLoadError(f"model: {path} holds {ours!r} both whole ({plan[ours][1]!r}) and by experts")
    model = build_model(config, lm_head=not backbone, device="meta")
    expected = list(model.state_dict())
    tie = not backbone and "lm_head.weight" in expected and _tied(config)
    if tie:
        plan.pop("lm_head.weight", None)  # HF ties it whatever the file holds
    elif "lm_head.weight" in expected and "lm_head.weight" not in plan:
        raise ModelLoadError(f"model: {path} has no lm_head.weight and its config does not tie it to the embedding "
                             f"(a bare backbone? load it with backbone=True)")
    need = [k for k in expected if not (tie and k == "lm_head.weight")]
    missing = [k for k in need if k not in plan and k not in pieces]
    if missing:
        raise ModelLoadError(f"model: {path} lacks tensor {to_hf_name(missing[0], config, backbone=backbone)!r} "
                             f"(ours {missing[0]!r}" + (f"; {len(missing) - 1} more)" if len(missing) > 1 else ")"))
    extra = [k for k in plan if k not in need]
    if extra:
        raise ModelLoadError(f"model: unexpected tensor {plan[extra[0]][1]!r} in {path} (ours {extra[0]!r})")
    extra = [k for k in pieces if k not in need]
    if extra:
        raise ModelLoadError(f"model: unexpected tensor {next(iter(pieces[extra[0]].values()))[1]!r} in {path} "
                             f"(ours {extra[0]!r})")
    dtype = _as_dtype(dtype) or _as_dtype(getattr(config, "dtype", None)) or _file_dtype(files)
    rows = {k: t.shape[0] for k, t in model.state_dict().items() if t.dim()}  # a fused tensor's parts' rows
    state = _read(plan, config, dtype, device, rows)
    if pieces:
        shapes = {k: t.shape for k, t in model.state_dict().items()}
        state.update(stacked.read(pieces, shapes, config, dtype, device))
    if tie:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tie:
        model.lm_head.weight = model.embed.weight  # one Parameter, as HF ties them
    return model


def _file_dtype(files: dict[str, list[str]]) -> torch.dtype:
    """The dtype of the first floating tensor stored (a checkpoint whose config names none)."""
    for file, keys in files.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                dt = _ST_DTYPES.get(f.get_slice(key).get_dtype())
                if dt is not None:
                    return dt
    return torch.float32


def _converted(t: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """`t` contiguous, in `dtype` (and on `device`), copied once if at all (`Tensor.to` alone keeps a transposed
    view's strides when nothing else changes)."""
    device = t.device if device is None else torch.device(device)
    if t.dtype == dtype and t.device == device:
        return t.contiguous()
    return t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)


def _read(plan: dict[str, tuple[str, str]], config, dtype: torch.dtype, device,
          rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """{our key: tensor} read one tensor at a time, each file opened once; a tensor is transposed (Conv1D) or cast
    only where it must be, so the rest are the very tensors safetensors returned. A fused tensor is split by rows
    into its parts (`rows`: each part's row count, from the meta-built model), each part a tensor of its own."""
    by_file: dict[str, dict[str, list[str]]] = {}
    for ours, (file, key) in plan.items():
        by_file.setdefault(file, {}).setdefault(key, []).append(ours)
    state = {}
    dev = str(torch.device(device))
    for file, by_key in by_file.items():
        try:
            with safe_open(file, framework="pt", device=dev) as f:
                for key, ours_keys in by_key.items():
                    t = f.get_tensor(key)
                    if is_transposed(ours_keys[0], config):
                        t = t.t()  # HF Conv1D (in, out) -> our nn.Linear (out, in)
                    dt = dtype if t.is_floating_point() else t.dtype
                    if len(ours_keys) == 1:
                        state[ours_keys[0]] = _converted(t, dt)
                        continue
                    sizes = [rows[k] for k in ours_keys]
                    if sum(sizes) != t.shape[0]:
                        raise ModelLoadError(f"model: tensor {key!r} in {file} has {t.shape[0]} rows; the config "
                                             f"makes its parts {', '.join(ours_keys)} {sum(sizes)} rows")
                    for k, piece in zip(ours_keys, t.split(sizes)):
                        part = _converted(piece, dt)
                        shared = part.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                        state[k] = part.clone() if shared else part  # a tensor of its own, not a view of the file's
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"model: cannot read {file}: {e}") from e
    return state


# ----------------------------------------------------------------------------------------------------- saving

def _full_state(model) -> dict[str, torch.Tensor] | None:
    """Our full state dict: the model's own tensors when unsharded; for an FSDP2 (DTensor) model every rank must
    call this, rank 0 gets the gathered CPU tensors and the other ranks None."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model.state_dict()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def _hf_state(model, state: dict[str, torch.Tensor], backbone: bool) -> dict[str, tuple[torch.Tensor, bool]]:
    """{HF key: (tensor, transpose it?)}, in our order; a tied lm_head is left out (HF stores the embedding alone).
    A TRANSPOSED weight is transposed unless its module is HF's Conv1D itself (a model `from_hf` converted). The
    parts of a fused HF tensor (`HF_SPLIT`) come as a list in row order, concatenated when the shard is written."""
    from transformers.pytorch_utils import Conv1D

    tied = not backbone and _tied(model.config)
    if tied and model.lm_head.weight is not model.embed.weight:
        raise ValueError("save_pretrained: the config ties lm_head to the embedding but the model holds two tensors")
    conv = {_strip_wrappers(n) for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", m), Conv1D)}
    out = {}
    for ours, t in state.items():
        ours = _strip_wrappers(ours)
        if tied and ours == "lm_head.weight":
            continue
        try:
            key = to_hf_name(ours, model.config, backbone=backbone)
        except KeyError:
            hint = (": export it with `models.save_model` (the merged weights + adapter/), or the merged weights "
                    "(`save_pretrained(model, path, state_dict=lora.merged_state_dict(model))`) or the adapter "
                    "(`lora.save_adapter`)") if ".lora_" in ours else ""
            raise ValueError(f"save_pretrained: {ours!r} has no Hugging Face name{hint}") from None
        split = stacked.pieces(ours, t, model.config, backbone=backbone)  # an MoE layer's experts, one by one
        if split is not None:
            out.update((k, (v, False)) for k, v in split.items())
            continue
        part = split_part(ours, model.config)
        if part is not None:
            j, n = part
            out.setdefault(key, ([None] * n, False))[0][j] = t
            continue
        out[key] = (t, is_transposed(ours, model.config) and ours.rpartition(".")[0] not in conv)
    for key, (t, _) in out.items():
        if isinstance(t, list) and any(p is None for p in t):
            raise ValueError(f"save_pretrained: {key!r} is fused from {len(t)} of our tensors, and the model lacks "
                             f"part {t.index(None)} of them")
    return out


def _numel(t: torch.Tensor | list[torch.Tensor]) -> int:
    return sum(p.numel() for p in t) if isinstance(t, list) else t.numel()


def _shards(hf: dict[str, tuple[torch.Tensor, bool]], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """HF keys grouped in order into shards of at most `max_bytes` (in `dtype`); a larger tensor is a shard alone."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, (t, _) in hf.items():
        first = t[0] if isinstance(t, list) else t
        n = _numel(t) * (dtype.itemsize if first.is_floating_point() else first.element_size())
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _export_tensor(t: torch.Tensor, transpose: bool, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as HF stores it: on the CPU, in `dtype` if floating, transposed if asked (Conv1D), contiguous; a
    list (the parts of a fused tensor) concatenated by rows."""
    if isinstance(t, list):
        t = torch.cat([p.detach().to("cpu") for p in t])
    t = t.detach()
    if transpose:
        t = t.t()
    return _converted(t, dtype if t.is_floating_point() else t.dtype, "cpu")


def _generation_config(config):
    """`GenerationConfig.from_model_config(config)` when it sets anything a blank config does not, else None."""
    from transformers import GenerationConfig, PretrainedConfig

    gen = GenerationConfig.from_model_config(config)
    blank = GenerationConfig.from_model_config(PretrainedConfig())
    drop = ("transformers_version",)
    same = {k: v for k, v in gen.to_diff_dict().items() if k not in drop} == \
        {k: v for k, v in blank.to_diff_dict().items() if k not in drop}
    return None if same else gen


def save_pretrained(model, path: str | Path, *, tokenizer=None, dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int = 2 * 2**30, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` (our DecoderLM, or its FSDP2-sharded form: then every rank calls this, rank 0 writes) as an HF
    model directory at `path`, replacing what is there at once (a temp dir renamed into place): config.json
    (`dtype` the saved dtype, `architectures` the causal LM, or the backbone class when the model has no lm_head),
    generation_config.json (when the config sets generation fields), safetensors in `dtype` (None = the model's;
    tied weights stored once; shards of at most `max_shard_bytes` with `model.safetensors.index.json` above it)
    and `tokenizer`'s files if given. `state_dict` (our names, full tensors; read on rank 0 only): what to write
    instead of the model's own (a LoRA model's `merged_state_dict`); a model holding adapters is refused without it."""
    names(model)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_pretrained: {path} is a file, not a model directory")
    if state_dict is None:
        state = _full_state(model)  # a collective for a sharded model: every rank, before anything can fail
    else:
        state = state_dict if _rank() == 0 else None
    try:
        if state is not None:  # None: an FSDP2 rank other than 0
            _write_dir(model, state, path, tokenizer, _as_dtype(dtype) or model.dtype, max_shard_bytes)
    finally:
        _barrier()  # no rank reads the directory before rank 0 has written it


def _write_dir(model, state: dict[str, torch.Tensor], path: Path, tokenizer, dtype: torch.dtype,
               max_shard_bytes: int) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    backbone = model.lm_head is None
    hf = _hf_state(model, state, backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = copy.deepcopy(model.config)
        config.dtype = str(dtype).removeprefix("torch.")
        classes = MODEL_MAPPING_NAMES if backbone else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        config.architectures = [classes[config.model_type]]
        config.save_pretrained(str(tmp))
        gen = None if backbone else _generation_config(config)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        _write_weights(tmp, hf, dtype, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_weights(out: Path, hf: dict[str, tuple[torch.Tensor, bool]], dtype: torch.dtype, max_bytes: int) -> None:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` when the tensors
    exceed `max_bytes`; one shard's tensors are converted at a time."""
    shards = _shards(hf, dtype, max_bytes)
    weight_map, total = {}, 0
    for k, keys in enumerate(shards, 1):
        name = SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors, ptrs = {}, set()
        for key in keys:
            t = _export_tensor(*hf[key], dtype)
            part = t.numel() * t.element_size() != t.untyped_storage().nbytes()  # a view (one expert of a stack)
            tensors[key] = t.clone() if part or t.data_ptr() in ptrs else t  # safetensors stores no shared storage
            ptrs.add(t.data_ptr())
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename finished directory `tmp` to `path`; an existing `path` is moved aside first and removed after."""
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}" if path.exists() else None
    if old is not None:
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
