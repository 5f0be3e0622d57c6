"""LoRA inside rlhf_fast's own modules (a `DecoderLM`, or a scalar head model's backbone), read and written in peft's
adapter format.

`apply_lora(model, cfg)` swaps the targeted `nn.Linear` projections for `LoRALinear`, which keeps the frozen base
`weight` / `bias` under the same names (the base's state-dict keys do not change) and adds the low-rank update
(LoRA, Hu et al. 2021, eq. 3):

    y = W x + b + (alpha / r) * B A dropout(x),   A: (r, in) kaiming-uniform, B: (out, r) zeros

so an adapted model starts equal to its base. The model's blocks run it through `layers.project`; `LoRALinear.forward`
computes the same for callers that use it as a module. `adapters_disabled(model)` gives the base (PPO's reference).
On a `heads.ScalarHeadModel` the adapters go into its backbone and the scalar head stays trainable. Apply them before
`parallelize`: FSDP2 shards the adapters with the rest. The resume checkpoint is the run's usual state dict.

Interchange with peft (`peft.PeftModel`): `save_adapter` writes `adapter_config.json` + `adapter_model.safetensors`
under peft's key names (`base_model.model.<HF module name>.lora_A.weight`), which `PeftModel.from_pretrained`
loads onto the HF base; `load_adapter` reads a peft adapter directory into ours. `merged_state_dict` is the merged
model (W + scaling * B A) under our names. `export` writes what a stage leaves: the merged model as the plain
directory the next stage loads (a causal LM, or a backbone + `scalar_head.safetensors`; the live weights are not
merged) plus the adapters in peft's format in `adapter/`.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.config import ConfigError
from rlhf_fast.models.loading import ModelLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"  # the adapters' peft directory inside an export
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (`base_model`) -> the HF model (`model`)
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_HALF = (torch.float16, torch.bfloat16)
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")  # wrappers' name segments


def _clean(name: str) -> str:
    """A module or state-dict name without the segments that checkpoint / compile wrappers add."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (in -> out) plus a rank-r update: W x + b + scaling * B A dropout(x).

    `weight` (out, in) and `bias` (out,) | None are the replaced linear's very Parameter objects; `lora_A`
    (`nn.Linear(in, r)`, weight (r, in)) and `lora_B` (`nn.Linear(r, out)`, weight (out, r)) are float32 on a
    half-precision base (as peft's `autocast_adapter_dtype`), else in the base's dtype. A is kaiming-uniform
    (a = sqrt(5), as peft and nn.Linear) drawn on the CPU from `generator` (so a seed gives the same A on every
    device), B is zero. `disabled` switches the update off."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRALinear: rank r must be > 0, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # a Parameter, or None (registered as such)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        dev, dt = self.weight.device, self.weight.dtype
        dt = torch.float32 if dt in _HALF else dt
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device="meta")
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(a.to(device=dev, dtype=dt))
        self.lora_B.weight = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))

    def forward(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """x (..., in) -> (..., out) in the base's dtype, as `layers.project(x, self, deterministic)` (2-D x there)."""
        from rlhf_fast.models.layers import linear

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        y = linear(x2, self.weight, self.bias, deterministic)  # (T, out)
        if not self.disabled:
            a, b = self.lora_A.weight, self.lora_B.weight
            z = linear(self.dropout(x2.to(a.dtype)), a, None, deterministic)  # (T, r)
            y = (y + linear(z, b, None, deterministic) * self.scaling).to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, disabled={self.disabled}")


# ---- injection -------------------------------------------------------------------------------------------------

def projections(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder projections of `model` by name (ours: `layers.0.attn.q_proj`): every `nn.Linear` or
    `LoRALinear` but the output head (`lm_head`)."""
    head = getattr(model, "lm_head", None)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and n and m is not head and n != "lm_head"
            and ".lora_" not in n}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The `LoRALinear` modules of `model` by name (none for a plain model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targets(spec) -> list[str] | str:
    if isinstance(spec, str):
        return "all-linear" if spec.strip() == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]
    return list(spec)


def target_names(model: nn.Module, target_modules) -> list[str]:
    """Our names of the projections `target_modules` selects (a comma-separated string or list of last names,
    e.g. "q_proj,v_proj", or "all-linear"), in module order. ConfigError for a name that matches nothing."""
    projs = projections(model)
    targets = _targets(target_modules)
    if targets == "all-linear":
        return list(projs)
    last = {n: n.rsplit(".", 1)[-1] for n in projs}
    known = sorted(set(last.values()))
    missing = [t for t in targets if t not in known]
    if missing or not targets:
        raise ConfigError(f"lora.target_modules: {', '.join(missing) or repr(target_modules)} matches no projection "
                          f"of this model; its projections are named {', '.join(known)} (or use all-linear)")
    return [n for n in projs if last[n] in targets]


def _inject(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, seed: int) -> list[str]:
    """LoRALinear in place of each named nn.Linear of `model`; every other parameter frozen."""
    have = lora_modules(model)
    if have:
        raise ValueError(f"apply_lora: the model already has adapters ({next(iter(have))}, ...)")
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, LoRALinear(old, r, alpha, dropout, generator=gen).train(old.training))
    return names


def _scalar_head(model: nn.Module) -> bool:
    return hasattr(model, "head") and hasattr(model, "lm")


def apply_lora(model: nn.Module, cfg, *, seed: int = 0) -> list[str]:
    """Adapters of rank `cfg.r`, scaling `cfg.alpha / cfg.r`, dropout `cfg.dropout` on the projections of `model`
    (a `DecoderLM`, or a `heads.ScalarHeadModel`: its backbone `.lm`) named by `cfg.target_modules` (last names, or
    "all-linear": every projection but lm_head), in place: the base Parameters stay the same objects, now frozen
    with every other parameter of the decoder; only lora_A / lora_B (and a scalar head) train. A is drawn from a
    generator seeded with `seed`, B is zero, so the model starts equal to its base. Returns our names of the adapted
    projections relative to the decoder (`layers.0.attn.q_proj`, ...).
    Apply it before `parallelize` (FSDP2 shards the parameters it finds); on a meta-built model the adapters are
    meta too (a later `load_state_dict(..., assign=True)` keeps their requires_grad)."""
    if cfg.r <= 0:
        raise ConfigError(f"lora.r: must be > 0 to apply adapters, got {cfg.r}")
    decoder = model.lm if _scalar_head(model) else model
    names = _inject(decoder, target_names(decoder, cfg.target_modules), cfg.r, cfg.alpha, cfg.dropout, seed)
    if decoder is not model:
        model.head.requires_grad_(True)
    return names


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` holds LoRA adapters."""
    return bool(lora_modules(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every adapter switched off, so it runs as its frozen base (PPO's reference); each one's
    previous state comes back on exit. A no-op for a model without adapters. Yields `model`."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """lora_A and lora_B weights of every adapter, in module order: what the optimiser steps."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' entries of `model.state_dict()` (our names, `layers.0.attn.q_proj.lora_A.weight`, ...)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`model`'s state dict with each adapter merged into its base, W + scaling * B A (added in float32, then cast
    to W's dtype), and no lora keys: our names, for the plain export (`state_dict_adapter.save_pretrained(model,
    path, state_dict=...)`). Floating tensors are cast to `dtype` (None: kept); tied weights (lm_head / embed) stay
    one tensor. The live weights are not changed. An FSDP2-sharded model is gathered (`distributed.
    full_state_dict`): every rank calls this, rank 0 gets the dict, the others an empty one."""
    from rlhf_fast import distributed

    scaling = {_clean(n): m.scaling for n, m in lora_modules(model).items()}
    state = {_clean(k): v for k, v in distributed.full_state_dict(model).items()}
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if mod in scaling and leaf == "weight":
            b, a = state[f"{mod}.lora_B.weight"].float(), state[f"{mod}.lora_A.weight"].float()
            v = (v.float() + (b @ a) * scaling[mod]).to(dtype or v.dtype)  # (out, r) @ (r, in)
        elif v.is_floating_point() and dtype is not None:
            v = cast.setdefault(v.data_ptr(), v.to(dtype))
        out[k] = v
    return out


merged_state = merged_state_dict  # the spec's name


# ---- peft's format ---------------------------------------------------------------------------------------------

def _hf_name(model: nn.Module, name: str) -> str:
    """The HF module name of our projection `name` (`layers.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`;
    no `model.` in a bare backbone)."""
    from rlhf_fast.models.state_dict_adapter import to_hf_name

    backbone = getattr(model, "lm_head", None) is None
    return to_hf_name(f"{name}.weight", model, backbone=backbone).removesuffix(".weight")


def _our_name(model: nn.Module, hf_name: str) -> str | None:
    """Our module name of the HF module `hf_name` (with or without the decoder prefix); None outside the mapping."""
    from rlhf_fast.models.state_dict_adapter import from_hf_name

    try:
        ours = from_hf_name(f"{hf_name}.weight", model)
    except KeyError:
        return None
    return None if ours is None else ours.removesuffix(".weight")


def _uniform(mods: dict[str, LoRALinear], attr: str):
    values = {getattr(m, attr) for m in mods.values()}
    if len(values) != 1:
        raise ValueError(f"save_adapter: the adapters differ in {attr} ({sorted(values)}); peft's format here "
                         f"takes one value for all")
    return values.pop()


def _fused_adapter(rows: list[int], parts: list[str], mods: dict[str, LoRALinear]) -> tuple[torch.Tensor, ...]:
    """(A, B) of the one LoRA on a fused HF module equal to our adapters on its parts: our `parts` (all the fused
    module's parts in row order, of `rows` rows each; `mods` holds the adapted ones) with rank-r adapters
    (A_j, B_j) become A = [A_j; ...] (k r, in) and B block-diagonal ((sum of rows), k r): part j's rows of B A are
    B_j A_j, a part without an adapter gets zero rows."""
    adapted = [p for p in parts if p in mods]
    a = torch.cat([_full(mods[p].lora_A.weight) for p in adapted])  # (k r, in)
    r = mods[adapted[0]].r
    b = a.new_zeros(sum(rows), a.shape[0])  # (rows, k r)
    for j, p in enumerate(adapted):
        off = sum(rows[:parts.index(p)])
        b[off:off + rows[parts.index(p)], j * r:(j + 1) * r] = _full(mods[p].lora_B.weight)
    return a, b


def save_adapter(model: nn.Module, path: str | Path, *, base_dir: str | Path | None) -> None:
    """`model`'s adapters as a peft adapter directory at `path`: `adapter_config.json` (peft's LoraConfig:
    `base_model_name_or_path` = `base_dir`, task CAUSAL_LM, or none for a backbone) and
    `adapter_model.safetensors` (`base_model.model.<HF name>.lora_{A,B}.weight`, in the adapters' dtype), so
    `peft.PeftModel.from_pretrained(<HF base>, path)` gives the same outputs as `model`. Adapters on the parts of a
    projection HF fuses (Phi-3's q/k/v_proj in `qkv_proj`) become one LoRA on the fused module (`_fused_adapter`)
    of rank k r (k adapted parts; `rank_pattern` / `alpha_pattern` keep its scaling). An FSDP2-sharded model:
    every rank calls this (the adapters alone are gathered), rank 0 writes."""
    from rlhf_fast import distributed
    from rlhf_fast.models.state_dict_adapter import split_siblings

    mods = {_clean(n): m for n, m in lora_modules(model).items()}
    if not mods:
        raise ValueError("save_adapter: the model has no adapters (apply_lora or load_adapter first)")
    r, scaling = _uniform(mods, "r"), _uniform(mods, "scaling")
    p = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in mods.values()}
    hf = {n: _hf_name(model, n) for n in mods}
    last = sorted({n.rsplit(".", 1)[-1] for n in mods})
    every = [_clean(n) for n in projections(model) if n.rsplit(".", 1)[-1] in last]
    hf_last = sorted({h.rsplit(".", 1)[-1] for h in hf.values()})
    targets = hf_last if sorted(every) == sorted(mods) else sorted(set(hf.values()))  # peft: a name = a suffix
    fused = {h: split_siblings(n, model) for n, h in hf.items() if split_siblings(n, model) is not None}
    projs = {_clean(n): m for n, m in projections(model).items()}
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if getattr(model, "lm_head", None) is not None else None,
        "base_model_name_or_path": None if base_dir is None else str(base_dir),
        "r": r,
        "lora_alpha": scaling * r,
        "lora_dropout": max(p),
        "target_modules": targets,
        "fan_in_fan_out": model.config.model_type == "gpt2",  # HF's GPT-2 projections are Conv1D (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},  # a fused module's rank k r (below)
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    tensors = {}
    for n, m in mods.items():  # same order on every rank: the gathers match
        h = hf[n]
        if h in fused:
            if f"{PEFT_PREFIX}{h}.lora_A.weight" not in tensors:
                a, b = _fused_adapter([projs[p].weight.shape[0] for p in fused[h]], fused[h], mods)
                tensors[f"{PEFT_PREFIX}{h}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{h}.lora_B.weight"] = a, b
                if a.shape[0] != r:
                    cfg["rank_pattern"][re.escape(h)] = a.shape[0]
                    cfg["alpha_pattern"][re.escape(h)] = scaling * a.shape[0]
            continue
        for x in "AB":
            tensors[f"{PEFT_PREFIX}{h}.lora_{x}.weight"] = _full(getattr(m, f"lora_{x}").weight)
    try:
        if distributed.is_main():
            _write_adapter(Path(path), cfg, tensors)
    finally:
        distributed.barrier()  # no rank reads the directory before rank 0 has written it


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP2-sharded parameter (DTensor) gathered (a collective), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _write_adapter(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / WEIGHTS_FILE),
              metadata={"format": "pt"})


# peft LoraConfig fields that change the function beyond W + scaling * B A, and their harmless values
_REFUSED = {
    "use_dora": (False, None),  # DoRA: a learned magnitude per output column
    "lora_bias": (False, None),  # a bias on lora_B
    "modules_to_save": (None, []),  # fully trained copies of other modules (e.g. the head)
    "bias": ("none", None),  # trained base biases
    "rank_pattern": ({}, None),  # per-module ranks
    "alpha_pattern": ({}, None),  # per-module alphas
    "target_parameters": (None, []),  # LoRA on bare parameters (MoE experts)
    "trainable_token_indices": (None, {}, []),  # trained rows of the embeddings
    "layer_replication": (None, []),  # layers stacked twice
    "alora_invocation_tokens": (None, []),  # activated LoRA
    "use_qalora": (False, None),
}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).exists():
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHTS_FILE))
    if (path / "adapter_model.bin").exists():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{path}: no {WEIGHTS_FILE} (or adapter_model.bin): not a peft adapter directory")


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """A peft LoRA adapter directory (`adapter_config.json` + weights, e.g. `PeftModel.save_pretrained`'s) into
    `model` (a `DecoderLM` of the adapter's base architecture, with no adapters yet): LoRALinear on exactly the
    modules the weights name, loaded (trainable), everything else frozen. `use_rslora` becomes its scaling
    (alpha / sqrt(r)). ModelLoadError for what the adapters here cannot represent: DoRA, LoRA biases, trained
    base biases, `modules_to_save`, per-module rank/alpha patterns, adapters on embeddings or the output head. An
    adapter on a module HF fuses from ours (Phi-3's `qkv_proj`: B A on the fused rows) goes to each part, with the
    same A and the part's rows of B (exact). Returns our names of the adapted projections."""
    from rlhf_fast.models.state_dict_adapter import split_siblings

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise ModelLoadError(f"{path}: no {CONFIG_FILE}: not a peft adapter directory")
    cfg = json.loads((path / CONFIG_FILE).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{path}: a {cfg.get('peft_type')} adapter; only LoRA loads into rlhf_fast's models")
    bad = [f"{k}={cfg[k]!r}" for k, ok in _REFUSED.items() if k in cfg and cfg[k] not in ok]
    if bad:
        raise ModelLoadError(f"{path}: {', '.join(bad)}: rlhf_fast's LoRA is plain W + (alpha/r) B A on the decoder "
                             f"projections with one rank and alpha; this adapter needs more")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha / math.sqrt(r) * r  # the same scaling, alpha / sqrt(r), as our alpha / r
    weights = _read_weights(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    projs = {_clean(n): n for n in projections(model)}  # our clean name -> the module's own path
    for key, w in weights.items():
        m = _KEY.match(key)
        ours = _our_name(model, m.group(1)) if m else None
        parts = split_siblings(ours, model) if ours is not None and ours not in projs else None  # a fused module
        if parts is not None and all(p in projs for p in parts):
            if m.group(2) == "A":
                for p in parts:
                    pairs.setdefault(p, {})["A"] = w
            else:  # B's rows: the parts' in order
                sizes = [model.get_submodule(projs[p]).weight.shape[0] for p in parts]
                if w.shape[0] != sum(sizes):
                    raise ModelLoadError(f"{path}: adapter tensor {key}: lora_B has {w.shape[0]} rows, the fused "
                                         f"{m.group(1)} {sum(sizes)}")
                for p, piece in zip(parts, w.split(sizes)):
                    pairs.setdefault(p, {})["B"] = piece
            continue
        if ours is None or ours not in projs:
            what = (f"{m.group(1)} is no decoder projection of this {model.config.model_type}" if m else
                    "not a LoRA A/B weight (a whole saved layer, or another adapter kind)")
            raise ModelLoadError(f"{path}: adapter tensor {key}: {what}; only lora_A / lora_B on the attention and "
                                 f"MLP projections load into rlhf_fast's models")
        pairs.setdefault(ours, {})[m.group(2)] = w
    order = [n for n in projs if n in pairs]
    for n in order:
        a, b = pairs[n].get("A"), pairs[n].get("B")
        lin = model.get_submodule(projs[n])
        if a is None or b is None or a.shape != (r, lin.in_features) or b.shape != (lin.out_features, r):
            raise ModelLoadError(f"{path}: adapter of {n}: lora_A {None if a is None else tuple(a.shape)}, lora_B "
                                 f"{None if b is None else tuple(b.shape)}; expected ({r}, {lin.in_features}) and "
                                 f"({lin.out_features}, {r}) (r = {r})")
    _inject(model, [projs[n] for n in order], r, alpha, float(cfg.get("lora_dropout", 0.0)), 0)
    with torch.no_grad():
        for n in order:
            m = model.get_submodule(projs[n])
            m.lora_A.weight.copy_(pairs[n]["A"])
            m.lora_B.weight.copy_(pairs[n]["B"])
    return [projs[n] for n in order]


# ---- a stage's export ------------------------------------------------------------------------------------------

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
