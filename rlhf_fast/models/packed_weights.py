"""A rollout's decode-time copy of the block projections, reordered for oneDNN (CPU fp32), q/k/v and gate/up fused.

A decode step multiplies a few dozen rows by every projection of every block. On the CPU, MKL's GEMM on the plain
(out, in) weight re-packs the weight on every call and, once the whole model no longer fits in cache, runs at about
half its in-cache speed (measured, 1 thread, 32 rows x hidden 256: 52 GFLOP/s cold against 86 hot); oneDNN on a
weight reordered once into its blocked layout keeps about 80 GFLOP/s cold (`ops._onednn`). Fusing q, k and v into one
projection, and gate and up into another, halves the calls and their per-call overhead.

`packed_projections(lm, rows_hint)` makes the copies for the duration of one `generate` (the weights must not change
inside it) and removes them after; it costs one reorder pass over the block weights and as much memory as they take.
It applies to plain `nn.Linear` projections only: fp32 on the CPU, no hooks put on from outside (tensor parallelism),
not an adapter (LoRA) or a sharded `DTensor`. The model code reads the copies through `fused(module, name)` and
`single(module)`; outside deterministic mode only (its fixed-chunk GEMMs are what make a row batch-invariant).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from rlhf_fast.ops import _onednn as onednn

FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
# below this a projection keeps MKL's GEMM: oneDNN's per-call overhead grows against its kernel's gain (a 40 x 128
# weight: 53 us a call against 8 us; 128 x 256 at 32 rows: 32 us against 25 hot, 62 against 78 cold)
MIN_ELEMENTS = 1 << 14
_SKIP = {"base_layer", "lora_A", "lora_B"}  # inside an adapter: `layers.project` reads these itself
_ATTR = "_onednn_pack"  # on a module: {name: (packed weight, bias or None)}; "" is the module's own projection


def _plain(m) -> bool:
    """An `nn.Linear` (exactly) whose weight oneDNN takes, with nothing hooked on it from outside."""
    return (type(m) is nn.Linear and not m._forward_pre_hooks and not m._forward_hooks
            and onednn.usable(m.weight) and m.weight.numel() >= MIN_ELEMENTS)


def _bias(parts: list[nn.Linear]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features) for p in parts])


@contextlib.contextmanager
def packed_projections(lm: nn.Module, rows_hint: int):
    """Within the block, the projections of `lm.layers` that apply run on oneDNN copies: q/k/v and gate/up fused where
    all of a group's projections apply, every other applicable projection on its own."""
    marked: list[nn.Module] = []
    try:
        for block in getattr(lm, "layers", ()):
            covered = set()  # the projections a fused copy replaces
            for mod in block.modules():
                packs = {}
                for name, parts in FUSED.items():
                    subs = [getattr(mod, p, None) for p in parts]
                    if all(_plain(s) for s in subs) and len({s.in_features for s in subs}) == 1:
                        w = torch.cat([s.weight.detach() for s in subs])
                        packs[name] = (onednn.reorder(w, rows_hint), _bias(subs))
                        covered.update(map(id, subs))
                if packs:
                    mod.__dict__[_ATTR] = packs
                    marked.append(mod)
            for name, mod in block.named_modules():
                if _plain(mod) and id(mod) not in covered and not _SKIP.intersection(name.split(".")):
                    bias = None if mod.bias is None else mod.bias.detach()
                    mod.__dict__[_ATTR] = {"": (onednn.reorder(mod.weight, rows_hint), bias)}
                    marked.append(mod)
        yield
    finally:
        for mod in marked:
            mod.__dict__.pop(_ATTR, None)


def fused(module: nn.Module, name: str, x: torch.Tensor, deterministic: bool) -> torch.Tensor | None:
    """x (T, in) through `module`'s fused `name` ("qkv", "gate_up") copy -> (T, sum of the parts' out), or None
    where there is none (or in deterministic mode)."""
    if deterministic:
        return None
    pack = module.__dict__.get(_ATTR)
    if pack is None or name not in pack:
        return None
    w, b = pack[name]
    return onednn.linear(x, w, b)


def single(module: nn.Module, x: torch.Tensor, deterministic: bool) -> torch.Tensor | None:
    """x through `module`'s own packed copy, or None."""
    return fused(module, "", x, deterministic)
