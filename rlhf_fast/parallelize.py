"""Parallelism applied to a model from outside: activation checkpointing, torch.compile and FSDP2, per block.

The model files know nothing of this module. `parallelize(model, spec)` takes a decoder (a module whose `.layers` is
an `nn.ModuleList` of blocks it calls as modules, like `models.DecoderLM`) or a root holding one as `.lm` (a decoder
backbone plus a head, like `heads.ScalarHeadModel`), and in torchtitan's order:

0. splits a Llama-family decoder over `tp` ranks (`tp` > 1, `tensor_parallel`) with torch's `parallelize_module`:
   q/k/v and gate/up column-parallel (each rank computes its heads and its MLP columns), o and down row-parallel
   (an all-reduce after each), the embedding (`VocabParallelEmbedding`) and the lm_head vocab-parallel (each rank
   holds V / tp rows; a scalar-head root: its backbone so, its head replicated); a mixture-of-experts layer by
   whole experts (E / tp per rank, the router replicated); kv heads fewer than tp ranks replicated (one per rank).
   The blocks see local tensors: their heads are the rank's own. The lm_head weight is read by
   `ops.vocab_parallel.head_logprobs`, which never gathers the logits;
1. wraps each block in torch's non-reentrant checkpoint wrapper (`checkpointing`): the block's activations are
   recomputed in the backward. The wrapper strips its own prefix from `state_dict()` keys, so the model's state dict
   (and DCP checkpoints, and exports) keep their names;
2. compiles each block in place (`compile`, `nn.Module.compile`: no `_orig_mod.` in any name). Dynamo traces into
   the `attend` callable a block receives; one whose plan depends on the batch (`models.packed`'s segments) makes
   every new batch layout a recompilation unless it is a compile boundary (`torch.compiler.disable`);
3. shards each block, then the root (embeddings, final norm, lm_head or head), with FSDP2 `fully_shard` (`shard`,
   world size > 1) over the data-parallel ranks (all of them, or the "dp" dimension of the dp x tp mesh).
   Gradients are summed over ranks, not averaged: our losses divide by global counts, so the sum is the
   one-process gradient. The root keeps its parameters gathered from its forward to its backward, so code
   may read `model.lm_head.weight` after the forward (the fused `ops.linear_token_logprobs`).

Checkpointing and sharding combine: the FSDP hooks sit on the checkpoint wrapper, the recomputation in the backward
runs the inner block with the parameters the pre-backward hook gathered.

`unsharded(*models)` gathers every parameter for a rollout: inside it the models run through their own `__call__`
(FSDP hooks firing) with no FSDP collective, so dp ranks that decode different numbers of steps cannot hang. A
tensor-parallel model is gathered over dp only (its tp shards stay); its tp group decodes in step.

Deterministic mode under tp: `tensor_parallel` gives each split projection a `batch_invariant(x)` that
`layers.project` calls (the fixed-chunk GEMM on the rank's shard; a row-parallel one all-gathers the ranks' partial
products and adds them in rank order), so a tp model's results do not depend on the batch either.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
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
    tp: int = 1  # tensor-parallel degree: the world is laid out as dp x tp (`distributed.use_tp`)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "tp" and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"ParallelSpec.{f.name} must be a bool, got {getattr(self, f.name)!r}")
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise TypeError(f"ParallelSpec.tp must be an int >= 1, got {self.tp!r}")


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
    if any(_is_wrapped(b) for b in layers) or _is_fsdp(model) or tp_sharded(model):
        raise ValueError(f"parallelize: {type(model).__name__} is already parallelized")
    mesh = distributed.use_tp(spec.tp)  # None at tp 1
    if mesh is not None:
        tensor_parallel(model, mesh["tp"])
    if spec.checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if spec.compile:
        for block in layers:
            block.compile(backend=COMPILE_BACKEND)
    if spec.shard and distributed.dp_size() > 1:
        _fully_shard(model, list(layers), spec, None if mesh is None else mesh["dp"])
    return model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model` (`model.layers`, or `model.lm.layers` for a root holding a backbone)."""
    for m in (model, getattr(model, "lm", None)):
        if isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m.layers
    raise TypeError(f"parallelize: {type(model).__name__} has no `.layers` nn.ModuleList (nor `.lm.layers`): "
                    f"expected a DecoderLM or a module holding one as `.lm`")


TP_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "mixtral", "qwen3_moe")  # what `tensor_parallel` splits
COLWISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")  # output features split
ROWWISE = ("attn.o_proj", "mlp.down_proj")  # input features split: each rank's partial output, then an all-reduce
EXPERTS = ("gate_up_proj", "down_proj")  # an MoE layer's stacked experts: whole experts split over the tp ranks


def tensor_parallel(model: nn.Module, mesh) -> None:
    """Split a Llama-family `DecoderLM` over the ranks of the 1-D DeviceMesh `mesh` in place (Megatron's layout,
    through torch's `parallelize_module`): each block's q/k/v and gate/up projections column-parallel (a rank holds
    heads / tp query heads, kv_heads / tp key/value heads and its MLP columns, and computes them with no
    communication), o and down row-parallel (its rows of their inputs; the outputs are all-reduced, two per block),
    the embedding vocab-parallel (`VocabParallelEmbedding`: V / tp rows, a masked lookup, all-reduced) and the
    lm_head likewise (a tied one shares the embedding's shard).

    A mixture-of-experts layer (Mixtral, Qwen3-MoE: `models.moe.SparseMoE`) is split by experts (expert parallelism
    inside the tp group): its stacked `experts.gate_up_proj` (E, 2F, H) and `down_proj` (E, H, F) become DTensors
    Shard(0) over the tp mesh (rank r holds the whole experts r E/tp .. (r+1) E/tp - 1), the router stays whole on
    every rank, so every tp rank routes every token the same way (the same `RoutingRecord`, the same balance loss).
    Each rank computes its experts' share of the layer's output (`moe.experts_partial`: zero for a token routed to
    none of them) and the shares are summed over the tp group (an all-reduce; in deterministic mode added in rank
    order); backward, the gradients of the layer's input and of its routing weights are summed over the ranks (each
    holds its experts' share), so the router's and the norms' gradients stay the same on every tp rank.

    The residual stream, the norms and the hidden states stay replicated: every tp rank computes them whole, so the
    packed attention runs on local heads as in one process. The lm_head is never called:
    `ops.vocab_parallel.head_logprobs` reads its local rows.

    A scalar-head root (`heads.ScalarHeadModel`: a backbone `.lm` with no lm_head and `head = Linear(hidden, 1)`)
    has its backbone split so; the head stays whole on every tp rank: it reads the hidden states, which are
    replicated after the row-parallel layers, so each tp rank computes the same scores and the same head gradient
    (FSDP shards the head over the dp ranks like the norms).

    Fewer kv heads than ranks (tp a multiple of num_kv_heads, e.g. 4 kv heads at tp 8): k_proj / v_proj stay whole
    on every rank (not DTensors), rank r computes kv head r kv / tp, the one its heads / tp query heads read
    (`_kv_head`); their weight's, bias's and input's gradients are summed over the tp ranks.

    ConfigError (one line) for a model it does not cover, or heads / vocabulary / experts not divisible by tp, kv
    heads neither dividing nor divisible by it."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _check_tp(model, mesh.size())  # the decoder to split: `model`, or a scalar-head root's backbone
    from torch.distributed.tensor import Shard, distribute_tensor

    tp = mesh.size()
    kv_whole = model.num_kv_heads % tp != 0  # tp a multiple of the kv heads: each rank one kv head, replicated
    skip = ("attn.k_proj", "attn.v_proj") if kv_whole else ()
    plan = {}
    for i, block in enumerate(model.layers):
        sparse = _sparse(block)
        plan.update({f"layers.{i}.{n}": ColwiseParallel() for n in COLWISE
                     if not (sparse and n.startswith("mlp.")) and n not in skip})
        plan.update({f"layers.{i}.{n}": RowwiseParallel() for n in ROWWISE if not (sparse and n.startswith("mlp."))})
    head = model.lm_head
    tied = head is not None and head.weight is model.embed.weight
    if head is not None and not tied:
        plan["lm_head"] = ColwiseParallel()  # weight (V / tp, hidden): vocab rows
    parallelize_module(model, mesh, plan)
    for block in model.layers:  # deterministic mode's path (`layers.project`): local fixed-chunk GEMMs
        sparse = _sparse(block)
        for n in COLWISE + ROWWISE:
            if sparse and n.startswith("mlp.") or n in skip:
                continue
            mod = block.get_submodule(n)
            mod.batch_invariant = functools.partial(_colwise_fixed if n in COLWISE else _rowwise_fixed, mod)
        for n in skip:  # rank r computes kv head r kv / tp (its query heads' group) from the whole, replicated weight
            mod = block.get_submodule(n)
            h, d = mesh.get_local_rank() * model.num_kv_heads // tp, block.head_dim
            mod._tp_group, mod._tp_rows = mesh.get_group(), (h * d, (h + 1) * d)
            mod.forward = functools.partial(_kv_head, mod, False)
            mod.batch_invariant = functools.partial(_kv_head, mod, True)
            mod.register_forward_pre_hook(_kv_input)
        if sparse:  # whole experts per rank (names unchanged: `mlp.experts.gate_up_proj`, `down_proj`)
            ex = block.mlp.experts
            for n in EXPERTS:
                p = getattr(ex, n)
                setattr(ex, n, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                            requires_grad=p.requires_grad))
            ex.split = functools.partial(_experts_split, ex)
    for block in model.layers:  # Qwen3's q/k norms: one weight over all heads, each rank normalises its own
        norms = [m for m in (getattr(block.attn, n, None) for n in ("q_norm", "k_norm")) if m is not None]
        for norm in norms:
            norm.__class__ = _summed_class(type(norm))
            norm._tp_group, norm._tp_sum = mesh.get_group(), False
        if norms:  # the summed weight inside the block's forward only (FSDP and DCP read the parameter itself)
            block.register_forward_pre_hook(functools.partial(_norms_summed, norms, True))
            block.register_forward_hook(functools.partial(_norms_summed, norms, False))
    model.embed = VocabParallelEmbedding(model.embed, mesh)
    if tied:
        head.weight = model.embed.weight  # the embedding's new (sharded) parameter, tied again


class VocabParallelEmbedding(nn.Module):
    """What `tensor_parallel` puts in place of a model's nn.Embedding (the state-dict name `weight` unchanged):
    `weight` (V, H) a DTensor split over the vocabulary of the tp mesh, this rank holding V / tp rows, and the
    forward `ops.vocab_parallel.vocab_parallel_embedding` on them (a masked local lookup and one all-reduce; its
    backward writes this rank's rows only). torch's RowwiseParallel on an nn.Embedding computes the same forward,
    but its backward builds the whole (V, H) gradient on every rank and all-reduces it (torch 2.13)."""

    def __init__(self, emb: nn.Embedding, mesh):
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight = nn.Parameter(distribute_tensor(emb.weight.detach(), mesh, [Shard(0)]),
                                   requires_grad=emb.weight.requires_grad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> (T, H), read from the weight as it is at call time (FSDP gathers it over the dp ranks)."""
        from rlhf_fast.ops.vocab_parallel import vocab_parallel_embedding

        rows = self.weight.to_local()  # (V / tp, H)
        mesh = self.weight.device_mesh
        return vocab_parallel_embedding(ids, rows, vocab_start=mesh.get_local_rank() * rows.shape[0],
                                        group=mesh.get_group(), padding_idx=self.padding_idx)


_SUMMED: dict[type, type] = {}


def _summed_class(cls: type) -> type:
    """`cls` (a norm module over the head dim) whose `weight`, read with gradients enabled inside its block's
    forward (`_norms_summed`), passes through `_Replicated`: the weight stays whole on every tp rank (state-dict
    name `weight` unchanged) and its gradient is the sum of the ranks' shares (each rank's heads), in rank order:
    one process's, the same on every rank."""
    if cls not in _SUMMED:
        def weight(self):
            w = self._parameters["weight"]
            if self._tp_sum and torch.is_grad_enabled() and w.requires_grad:
                return _Replicated.apply(w, self._tp_group)
            return w

        _SUMMED[cls] = type(f"TpSummed{cls.__name__}", (cls,), {"weight": property(weight)})
    return _SUMMED[cls]


def _kv_input(mod: nn.Module, args: tuple) -> tuple:
    """A replicated k/v projection's forward pre-hook (`project` calls a hooked Linear as a module): its input's
    gradient is the sum of the tp ranks' shares (each rank's query heads'), as a column-parallel input's."""
    x = args[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return (_ReplicatedSum.apply(x, mod._tp_group), *args[1:])
    return args


def _kv_head(mod: nn.Linear, deterministic: bool, x: torch.Tensor) -> torch.Tensor:
    """A k or v projection whose kv heads are fewer than the tp ranks (`tensor_parallel`): the weight (and bias)
    stay whole on every rank (names and state dict unchanged), the rank computes the one kv head its query heads
    read, rows `_tp_rows` of the output -> (T, head_dim). The weight enters through `_Replicated`: its gradient (the
    rank's query heads' share of that head's rows) summed over the tp ranks is one process's, on every rank.
    Deterministic mode (`batch_invariant`): the fixed-chunk GEMM and the input's gradient summed in rank order."""
    from rlhf_fast.models.layers import linear

    lo, hi = mod._tp_rows
    w, b = mod.weight, mod.bias
    if torch.is_grad_enabled():
        wrap = _Replicated if deterministic else _ReplicatedSum
        w = wrap.apply(w, mod._tp_group) if w.requires_grad else w
        b = wrap.apply(b, mod._tp_group) if b is not None and b.requires_grad else b
        if deterministic and x.requires_grad:
            x = _Replicated.apply(x, mod._tp_group)
    return linear(x, w[lo:hi], None if b is None else b[lo:hi], deterministic)


def _norms_summed(norms: list[nn.Module], on: bool, *args) -> None:
    """A block's forward pre-hook (on) and forward hook (off): its q/k norms read their weight summed over tp."""
    for norm in norms:
        norm._tp_sum = on


def _sparse(block: nn.Module) -> bool:
    """Whether `block`'s MLP is a mixture of experts (`models.moe.SparseMoE`)."""
    from rlhf_fast.models.moe import SparseMoE

    return isinstance(getattr(block, "mlp", None), SparseMoE)


def _experts_split(experts: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, act,
                   deterministic: bool) -> torch.Tensor:
    """An MoE layer's experts split over the tp ranks (`tensor_parallel`): x (N, hidden) and the routing `ids`,
    `weights` (N, k), the same on every tp rank -> the layer's output (N, hidden), the same on every rank: this
    rank's experts' share (`moe.experts_partial`) summed over the group (all-reduce; deterministic mode: in rank
    order, `_SumInRankOrder`). x and weights enter through `_Replicated` / `_AllReduced`: backward, their gradients
    are the sum of the ranks' shares, as one process's."""
    from rlhf_fast.models.moe import experts_partial

    gate_up, down = experts.gate_up_proj, experts.down_proj
    mesh = gate_up.device_mesh
    group = mesh.get_group()
    gu, dn = _local(gate_up), _local(down)  # (E / tp, 2F, hidden), (E / tp, hidden, F)
    first = mesh.get_local_rank() * gu.shape[0]
    if torch.is_grad_enabled():
        wrap = _Replicated if deterministic else _ReplicatedSum
        x = wrap.apply(x, group) if x.requires_grad else x
        weights = wrap.apply(weights, group) if weights.requires_grad else weights
    y = experts_partial(x, ids, weights, gu, dn, first, act, deterministic)
    return (_SumInRankOrder if deterministic else _AllReduced).apply(y, group)


class _AllReduced(torch.autograd.Function):
    """Partial outputs of the ranks of `group` -> their sum (an all-reduce). Backward: the identity (the output's
    gradient is replicated; each rank's partial gets it whole)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        y = partial.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _colwise_fixed(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A column-parallel projection in deterministic mode: x (T, in) replicated -> this rank's columns (T, out / tp)
    through the batch-invariant fixed-chunk GEMM (`layers.linear`); what ColwiseParallel computes, bit for bit
    whatever T. Backward: x's gradient is the sum of every rank's share (`_Replicated`)."""
    from rlhf_fast.models.layers import linear

    if torch.is_grad_enabled() and x.requires_grad:
        x = _Replicated.apply(x, mod.weight.device_mesh.get_group())
    return linear(x, _local(mod.weight), _local(mod.bias), True)


def _rowwise_fixed(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A row-parallel projection in deterministic mode: x (T, in / tp) this rank's columns -> (T, out) replicated:
    each rank's partial product (fixed-chunk GEMM) all-gathered and added in rank order (`_SumInRankOrder`), so the
    result's bits depend neither on T nor on the backend's all-reduce order; then the bias."""
    from rlhf_fast.models.layers import linear

    y = _SumInRankOrder.apply(linear(x, _local(mod.weight), None, True), mod.weight.device_mesh.get_group())
    return y + _local(mod.bias) if mod.bias is not None else y


def _sum_in_rank_order(t: torch.Tensor, group) -> torch.Tensor:
    """The sum over the ranks of `group` of each rank's `t`, all-gathered and added in rank order: the same bits on
    every rank, whatever t's size (an all-reduce's order may depend on it)."""
    from torch.distributed import _functional_collectives as funcol

    n = torch.distributed.get_world_size(group)
    parts = funcol.all_gather_single(t.contiguous(), 0, group).view(n, *t.shape)  # (tp, ...)
    out = parts[0]
    for r in range(1, n):
        out = out + parts[r]
    return out


class _SumInRankOrder(torch.autograd.Function):
    """Partial products (T, out) of the ranks of `group` -> their sum (`_sum_in_rank_order`). Backward: the identity
    (the output's gradient is replicated; each rank's partial gets it whole), as the row-parallel all-reduce's."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        return _sum_in_rank_order(partial, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Replicated(torch.autograd.Function):
    """A replicated input of a column-parallel projection: the identity forward; backward, the sum of the ranks'
    gradients (each rank's holds its columns' share; `_sum_in_rank_order`), as ColwiseParallel's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_in_rank_order(grad, ctx.group), None


class _ReplicatedSum(_Replicated):
    """`_Replicated` with an all-reduce in the backward (outside deterministic mode: the sum's order is the
    backend's)."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.contiguous().clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


def _check_tp(model: nn.Module, tp: int) -> nn.Module:
    """The decoder `tensor_parallel` splits: `model` itself, or the backbone `.lm` of a scalar-head root (a head
    `Linear(hidden, 1)` beside it, no lm_head, no other parameters); ConfigError (one line) otherwise."""
    from rlhf_fast.config import ConfigError
    from rlhf_fast.models import mixtral
    from rlhf_fast.models.llama import Block
    from rlhf_fast.models.moe import Experts, Router

    root = model
    lm = getattr(model, "lm", None)
    if lm is not None:
        head = getattr(model, "head", None)
        scalar = (type(head) is nn.Linear and head.out_features == 1 and getattr(lm, "lm_head", 0) is None
                  and {n.split(".")[0] for n, _ in model.named_parameters()} <= {"lm", "head"})
        if not scalar:
            raise ConfigError(f"parallel.tp: a model holding a backbone as `.lm` splits only as a scalar-head model "
                              f"(`head` a plain Linear(hidden, 1), no LoRA, no lm_head); {type(model).__name__} is "
                              f"not one: train it with tp = 1")
        model = lm

    def plain(block: nn.Module) -> bool:  # a converted Phi-3's fused qkv_proj, LoRA layers: not these
        sparse = type(block) is mixtral.Block and _sparse(block)
        names = [n for n in COLWISE + ROWWISE if not (sparse and n.startswith("mlp."))]
        mods = [getattr(getattr(block, a, None), b, None) for a, b in (n.split(".") for n in names)]
        moe_ok = not sparse or (type(block.mlp.experts) is Experts and type(block.mlp.router) is Router)
        return type(block) in (Block, mixtral.Block) and moe_ok and all(type(m) is nn.Linear for m in mods)

    layers = getattr(model, "layers", None)
    if getattr(model, "lm", None) is not None or not isinstance(layers, nn.ModuleList) or not all(map(plain, layers)):
        raise ConfigError(f"parallel.tp: tensor parallelism splits causal LMs of the Llama families "
                          f"({', '.join(TP_FAMILIES)}) with plain q/k/v/o and gate/up/down projections (no LoRA), "
                          f"or a scalar-head model on one; {type(root).__name__} is not one: train it with tp = 1")
    experts = {b.mlp.experts.gate_up_proj.shape[0] for b in layers if _sparse(b)}
    bad = [f"{k} {n}" for k, n in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads),
                                   ("vocab_size", model.vocab_size), *(("num_experts", e) for e in sorted(experts)))
           if n % tp and not (k == "num_kv_heads" and tp % n == 0)]  # tp a multiple of kv heads: replicated
    if bad:
        raise ConfigError(f"parallel.tp: {tp} must divide the model's {', '.join(bad)}")
    return model


def tp_sharded(model: nn.Module | None) -> bool:
    """Whether `model` holds parameters split by `tensor_parallel` (DTensors on a mesh with a "tp" dimension)."""
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ())
                                     for p in model.parameters())


def _fully_shard(model: nn.Module, layers: list[nn.Module], spec: ParallelSpec, mesh) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {} if mesh is None else {"mesh": mesh}
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
    (the same model twice) gather once. None entries and unsharded models are ignored.

    A tensor-parallel model (dp x tp mesh) is gathered over the dp ranks only: inside, each parameter `tensor_parallel`
    split is its tp shard (a DTensor over the "tp" mesh), never the whole tensor. Its forwards still run the tp
    group's collectives, so the ranks of a tp group decode in step (`rollout/tp.py`); dp groups need not."""
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
