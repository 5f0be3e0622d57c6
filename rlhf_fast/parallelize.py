"""Parallelism applied to a model from outside: activation checkpointing, torch.compile and FSDP2, per block.

The model files know nothing of this module. `parallelize(model, spec)` takes a decoder (a module whose `.layers` is
an `nn.ModuleList` of blocks it calls as modules, like `models.DecoderLM`) or a root holding one as `.lm` (a decoder
backbone plus a head, like `heads.ScalarHeadModel`), and in torchtitan's order:

1. wraps each block in torch's non-reentrant checkpoint wrapper (`checkpointing`): the block's activations are
   recomputed in the backward. The wrapper strips its own prefix from `state_dict()` keys, so the model's state dict
   (and DCP checkpoints, and exports) keep their names;
2. compiles each block in place (`compile`, `nn.Module.compile`: no `_orig_mod.` in any name). Dynamo traces into
   the `attend` callable a block receives; one whose plan depends on the batch (`models.packed`'s segments) makes
   every new batch layout a recompilation unless it is a compile boundary (`torch.compiler.disable`);
3. shards each block, then the root (embeddings, final norm, lm_head or head), with FSDP2 `fully_shard` (`shard`,
   world size > 1). Gradients are summed over ranks, not averaged: our losses divide by global counts, so the sum
   is the one-process gradient. The root keeps its parameters gathered from its forward to its backward, so code
   may read `model.lm_head.weight` after the forward (the fused `ops.linear_token_logprobs`).

Checkpointing and sharding combine: the FSDP hooks sit on the checkpoint wrapper, the recomputation in the backward
runs the inner block with the parameters the pre-backward hook gathered.

`unsharded(*models)` gathers every parameter for a rollout: inside it the models run through their own `__call__`
(FSDP hooks firing) with no collective at all, so ranks that decode different numbers of steps cannot hang.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from rlhf_fast import distributed

COMPILE_BACKEND = "inductor"  # torch.compile backend of `compile=True` ("eager" / "aot_eager" to debug)

_RESHARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # FSDP module -> its reshard_after_forward
_DEPTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # FSDP module -> nesting depth in `unsharded`


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    """How `parallelize` treats a model. Every option is a no-op where it cannot apply (world size 1: no sharding;
    CPU: no mixed precision)."""

    shard: bool = True  # FSDP2 per block and on the root when the world size is > 1
    checkpointing: bool = False  # recompute each block's activations in the backward (memory for compute)
    compile: bool = False  # torch.compile each block (COMPILE_BACKEND); inductor rounds differently from eager
    mixed_precision: bool = False  # CUDA + shard: bf16 all-gathers and compute, fp32 gradient reduction
    reshard_after_forward: bool = True  # blocks free their gathered parameters after the forward (the root never)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"ParallelSpec.{f.name} must be a bool, got {getattr(self, f.name)!r}")


def parallelize(model: nn.Module, spec: ParallelSpec | None = None, **options: bool) -> nn.Module:
    """Apply `spec` (or `ParallelSpec(**options)`) to `model` in place and return it.

    model: a decoder with `.layers` (nn.ModuleList of blocks), or a root with such a decoder as `.lm`. Apply LoRA
        and move the model to its device before: FSDP shards the parameters it finds here.
    """
    if spec is None:
        spec = ParallelSpec(**options)
    elif options:
        raise TypeError("parallelize: pass a ParallelSpec or keyword options, not both")
    layers = blocks(model)
    if any(_is_wrapped(b) for b in layers) or _is_fsdp(model):
        raise ValueError(f"parallelize: {type(model).__name__} is already parallelized")
    if spec.checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if spec.compile:
        for block in layers:
            block.compile(backend=COMPILE_BACKEND)
    if spec.shard and distributed.world_size() > 1:
        _fully_shard(model, list(layers), spec)
    return model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model` (`model.layers`, or `model.lm.layers` for a root holding a backbone)."""
    for m in (model, getattr(model, "lm", None)):
        if isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m.layers
    raise TypeError(f"parallelize: {type(model).__name__} has no `.layers` nn.ModuleList (nor `.lm.layers`): "
                    f"expected a DecoderLM or a module holding one as `.lm`")


def _fully_shard(model: nn.Module, layers: list[nn.Module], spec: ParallelSpec) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if spec.mixed_precision and next(model.parameters()).device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in layers:
        fully_shard(block, reshard_after_forward=spec.reshard_after_forward, **kw)
        _RESHARD[block] = spec.reshard_after_forward
    fully_shard(model, reshard_after_forward=False, **kw)
    _RESHARD[model] = False
    for m in (*layers, model):
        m.set_gradient_divide_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):  # gloo has no PREMUL_SUM
            m.set_force_sum_reduction_for_comms(True)


def _is_wrapped(block: nn.Module) -> bool:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return isinstance(block, CheckpointWrapper) or _is_fsdp(block)


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_modules(model: nn.Module | None) -> list[nn.Module]:
    """The FSDP2 modules in `model` (blocks first, the root last); [] when it is not sharded."""
    if model is None or distributed.world_size() == 1:
        return []
    return [m for m in reversed(list(model.modules())) if _is_fsdp(m)]


@contextlib.contextmanager
def unsharded(*models: nn.Module | None) -> Iterator[None]:
    """Every parameter of `models` gathered for the duration, and no FSDP module resharding after its forward:
    calling the models (their FSDP hooks fire as usual) then runs no collective, so a rank may decode any number of
    steps, or none, while the others decode theirs. Call it on every rank (the gathering is one all-gather per FSDP
    module), between optimiser steps; run the models under `torch.no_grad()` inside it (a backward would reduce
    gradients). On exit each module's `reshard_after_forward` is restored and its parameters resharded; nested uses
    (the same model twice) gather once. None entries and unsharded models are ignored."""
    roots = [m for m in dict.fromkeys(models) if m is not None and _is_fsdp(m)]
    mods = list(dict.fromkeys(x for r in roots for x in fsdp_modules(r)))
    fresh = [m for m in mods if _DEPTH.get(m, 0) == 0]  # not yet gathered by an enclosing `unsharded`
    with torch.inference_mode(False):  # FSDP keeps the gathered buffers: they must not become inference tensors
        for m in fresh:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        _DEPTH[m] = _DEPTH.get(m, 0) + 1
    try:
        yield
    finally:
        for m in mods:
            _DEPTH[m] -= 1
        for r in roots:  # the decoding's forwards leave FSDP's per-iteration records (post-forward order) behind
            if r in fresh and hasattr(r, "reset_iter_state"):
                _reset(r)
        for m in fresh:
            m.set_reshard_after_forward(_RESHARD.get(m, m not in roots), recurse=False)
            m.reshard()


def _reset(root: nn.Module) -> None:
    """FSDP's per-iteration records cleared and parameters resharded (FSDPModule.reset_iter_state)."""
    try:
        root.reset_iter_state()
    except RuntimeError:  # a module inside another FSDP root: the records are that root's
        pass
    except AttributeError:  # no forward ever ran through it: FSDP has not set up the records to clear (torch 2.13)
        pass
