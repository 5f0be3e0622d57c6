"""Our parameters that Hugging Face checkpoints store as several tensors: an MoE layer's experts.

We hold an MoE layer's experts stacked (`gate_up_proj` (E, 2F, H), `down_proj` (E, H, F)), as transformers does in
memory; its checkpoints (what `save_pretrained` writes, and what the Hub holds) keep each expert's projections apart
(`model.layers.0.mlp.experts.3.gate_proj.weight`, Mixtral's `...block_sparse_moe.experts.3.w1.weight`). A family
lists those parameters in `HF_CHECKPOINT[model_type]`: our parameter name -> its checkpoint keys relative to the
backbone, `{i}` the block and `{e}` the expert. Our parameter is the keys' tensors concatenated by rows in the
listed order, stacked over the experts when the keys have an `{e}` (one key without `{e}`: a plain rename).

`state_dict_adapter` reads the pieces into the stacked parameter on load (`plan`, `read`) and writes them apart on
export (`pieces`), so an export round-trips bitwise through transformers' `from_pretrained`.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rlhf_fast.models.loading import ModelLoadError

_SLOTS = ("i", "e")  # the numbered path segments of a checkpoint key, in order: block, expert


@functools.lru_cache(maxsize=None)
def _tables(kind: str | None) -> tuple[str, dict[str, tuple[str, ...]], dict[str, tuple[str, int]]]:
    """(the backbone's prefix, {our template: checkpoint templates}, {checkpoint template: (our template, part)})."""
    from rlhf_fast import models

    fam = models._FAMILIES.get(kind)
    table = dict(getattr(fam, "HF_CHECKPOINT", {}).get(kind, {})) if fam is not None else {}
    reverse = {hf: (ours, j) for ours, keys in table.items() for j, hf in enumerate(keys)}
    return (f"{fam.HF_PREFIX}." if fam is not None else ""), table, reverse


def _kind(model_or_config) -> str | None:
    return getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)


def _template(key: str) -> tuple[str, dict[str, str]]:
    """`key` with its numbered segments as `{i}` (then `{e}`), and their values."""
    segs, values = key.split("."), {}
    for n, s in enumerate(segs):
        if s.isdigit() and len(values) < len(_SLOTS):
            slot = _SLOTS[len(values)]
            values[slot], segs[n] = s, f"{{{slot}}}"
    return ".".join(segs), values


def piece(hf_key: str, config) -> tuple[str, int, int] | None:
    """(our key, expert, part) of checkpoint key `hf_key` (a causal LM's or a bare backbone's) that is a piece of one
    of our stacked parameters, else None."""
    prefix, _, reverse = _tables(_kind(config))
    if not reverse:
        return None
    tmpl, values = _template(hf_key.removeprefix(prefix))
    hit = reverse.get(tmpl)
    if hit is None:
        return None
    ours, j = hit
    return ours.format(i=values.get("i")), int(values.get("e", 0)), j


def plan(files: dict[str, list[str]], config) -> dict[str, dict[tuple[int, int], tuple[str, str]]]:
    """{our key: {(expert, part): (file, checkpoint key)}} of the pieces in a checkpoint's `files` ({file: keys})."""
    out: dict[str, dict[tuple[int, int], tuple[str, str]]] = {}
    for file, keys in files.items():
        for key in keys:
            hit = piece(key, config)
            if hit is not None:
                ours, e, j = hit
                if (e, j) in out.setdefault(ours, {}):
                    raise ModelLoadError(f"model: tensor {key!r} twice in {Path(file).parent} (a causal LM's and a "
                                         "backbone's names mixed)")
                out[ours][(e, j)] = (file, key)
    return out


def _missing_key(ours: str, e: int, j: int, config, have: dict) -> str:
    """The checkpoint key of piece (e, j) of our key `ours`, with the prefix the checkpoint's other keys have."""
    prefix, table, _ = _tables(_kind(config))
    tmpl, values = _template(ours)
    with_prefix = any(k.startswith(prefix) for _, k in have.values())
    return (prefix if with_prefix else "") + table[tmpl][j].format(i=values.get("i"), e=e)


def read(pieces: dict[str, dict[tuple[int, int], tuple[str, str]]], shapes: dict[str, torch.Size], config,
         dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """{our key: the stacked tensor} from `plan`'s pieces, in `dtype` on `device`; `shapes`: our parameters' shapes
    (a meta-built model's), which give the number of experts. ModelLoadError for a missing or extra piece."""
    _, table, _ = _tables(_kind(config))
    state = {}
    dev = str(torch.device(device))
    with contextlib.ExitStack() as stack:
        opened: dict[str, object] = {}

        def get(file: str, key: str) -> torch.Tensor:
            if file not in opened:
                opened[file] = stack.enter_context(safe_open(file, framework="pt", device=dev))
            return opened[file].get_tensor(key)

        for ours, have in pieces.items():
            tmpl = _template(ours)[0]
            experts = shapes[ours][0] if "{e}" in table[tmpl][0] else 1
            parts = len(table[tmpl])
            need = {(e, j) for e in range(experts) for j in range(parts)}
            gone = sorted(need - have.keys())
            if gone:
                raise ModelLoadError(f"model: lacks tensor {_missing_key(ours, *gone[0], config, have)!r} (a piece of "
                                     f"our {ours!r}" + (f"; {len(gone) - 1} more)" if len(gone) > 1 else ")"))
            extra = sorted(have.keys() - need)
            if extra:
                raise ModelLoadError(f"model: unexpected tensor {have[extra[0]][1]!r}: our {ours!r} has "
                                     f"{experts} experts")
            try:
                rows = [torch.cat([get(*have[(e, j)]) for j in range(parts)]) for e in range(experts)]
            except (OSError, SafetensorError) as err:
                raise ModelLoadError(f"model: cannot read the pieces of {ours!r}: {err}") from err
            t = torch.stack(rows) if "{e}" in table[tmpl][0] else rows[0]
            if t.shape != shapes[ours]:
                raise ModelLoadError(f"model: the pieces of {ours!r} make shape {tuple(t.shape)}, the config "
                                     f"{tuple(shapes[ours])}")
            state[ours] = t.to(dtype) if t.is_floating_point() else t
    return state


def pieces(ours: str, t: torch.Tensor, config, *, backbone: bool) -> dict[str, torch.Tensor] | None:
    """{checkpoint key: tensor} that our parameter `ours` (holding `t`) is written as, or None when it is written
    under its own HF name. The tensors are views of `t` (the writer copies them out)."""
    prefix, table, _ = _tables(_kind(config))
    if not table:
        return None
    tmpl, values = _template(ours)
    keys = table.get(tmpl)
    if keys is None:
        return None
    prefix = "" if backbone else prefix
    stacked = "{e}" in keys[0]
    out = {}
    for e in range(t.shape[0] if stacked else 1):
        for j, part in enumerate((t[e] if stacked else t).chunk(len(keys), dim=0)):
            out[prefix + keys[j].format(i=values.get("i"), e=e)] = part
    return out
