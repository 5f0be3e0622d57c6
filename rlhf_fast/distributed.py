"""Every process group and collective of rlhf_fast: torchrun's processes, FSDP2 sharding, global statistics, DCP.

A stage is written once, for N processes; at world size 1 (a plain `rlhf-fast ...`, or torchrun with one process)
every helper here is the identity and no process group exists, so the result is bitwise what one process gives.

- `init()` joins the job torchrun describes in the environment (gloo for CPU tensors, NCCL for CUDA).
- `use_tp(tp)` lays the world out as a 2-D ("dp", "tp") device mesh for tensor parallelism: the ranks of a tp group
  hold one model between them and see the same data, so the data helpers below count the dp ranks only.
- `all_sum`, `all_max`, `masked_moments`, ... reduce statistics over ranks; `rank_slice` / `micro_slices` cut a
  global batch into this rank's (its dp rank's) part and its micro-batches; `accumulate` runs its forwards and
  backwards.
- `clip_grad_norm` clips sharded gradients by their global norm.
- `save_state` / `load_state` write and read model + optimiser state with `torch.distributed.checkpoint` (one file per
  rank plus metadata, loadable at any world size); `full_state_dict` gathers a sharded model's whole state on rank 0
  (the Hugging Face export, `models.save_model`).

Sharding itself (FSDP2 on each block and the root, and gathering the parameters for a rollout) is applied from
outside the model by `rlhf_fast.parallelize`.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0  # a collective that waits longer than this fails with DistributedError


class DistributedError(RuntimeError):
    """A process-group problem (a rank that does not answer, a bad launch); the message says what to check."""


# --- processes -------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the torchrun job in the environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, rendezvous). Idempotent. With
    `WORLD_SIZE` unset or 1 nothing happens. `RLHF_FAST_DIST_TIMEOUT_S` overrides `timeout_s`. CUDA runs use NCCL for CUDA tensors (and gloo for CPU ones); each rank
    takes GPU `LOCAL_RANK`."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    timeout_s = float(os.environ.get("RLHF_FAST_DIST_TIMEOUT_S", timeout_s))
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # rendezvous failures come out of c10d with little context
        raise DistributedError(f"rank {os.environ.get('RANK')}: could not join the process group "
                               f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                               f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}") from e
    log.info("rank %d/%d joined (%s)", rank(), world_size(), dist.get_backend())


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# --- the device mesh: data parallel x tensor parallel --------------------------------------------------------

_TP = 1  # this process's tensor-parallel degree (`use_tp`)
_MESHES: dict = {}  # tp -> its ("dp", "tp") DeviceMesh


def use_tp(tp: int):
    """Lay torchrun's world out as dp x tp and return the 2-D DeviceMesh ("dp", "tp") (None for tp 1: no mesh, the
    world as it is). Rank r sits at (r // tp, r % tp): a tp group is tp consecutive ranks (one node's GPUs). From
    here on `dp_rank`/`dp_size` (and so the data helpers and `all_sum`) count data-parallel ranks: the tp ranks of
    one group see the same items and hold the same statistics. `parallelize` calls it for every model it prepares,
    so the layout is the one of the models in use. DistributedError when tp does not divide the world size."""
    global _TP
    if tp < 1 or world_size() % tp:
        raise DistributedError(f"parallel.tp = {tp} does not divide the world size {world_size()} (torchrun "
                               f"--nproc_per_node x nodes): the world is laid out as dp x tp")
    _TP = tp
    if tp == 1:
        return None
    if tp not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        kind = "cuda" if torch.cuda.is_available() else "cpu"
        _MESHES[tp] = init_device_mesh(kind, (world_size() // tp, tp), mesh_dim_names=("dp", "tp"))
    return _MESHES[tp]


def tp_size() -> int:
    """The tensor-parallel degree of the models in use (`use_tp`); 1 without tensor parallelism."""
    return _TP


def dp_size() -> int:
    """Data-parallel ranks: the world size over the tensor-parallel degree."""
    return world_size() // _TP


def dp_rank() -> int:
    """This rank's data-parallel index: the part of every global batch it (and its tp group) works on."""
    return rank() // _TP


def _data_group():
    """The process group data statistics are summed over: the world, or this rank's dp group under tp."""
    return None if _TP == 1 else _MESHES[_TP].get_group("dp")


def is_main() -> bool:
    """True on rank 0, the one rank that prints, logs metrics and writes reports and exports."""
    return rank() == 0


def device(name: str) -> torch.device:
    """The torch device for config value `name` (auto | cpu | cuda | cuda:N) on this rank: under torchrun,
    `cuda` and `auto` mean this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world_size() > 1:
        return torch.device("cuda", local_rank())
    return torch.device(name)


def barrier() -> None:
    d = _dist()
    if d:
        _guard("barrier", d.barrier)


def _guard(what: str, fn: Callable, *args):
    """Run collective `fn`; a timeout or a lost peer becomes one DistributedError naming the collective."""
    try:
        return fn(*args)
    except RuntimeError as e:
        raise DistributedError(f"rank {rank()}/{world_size()}: {what} failed ({e}); another rank probably "
                               f"raised or is stuck (see its log), or the process-group timeout is too short") from e


# --- global statistics -----------------------------------------------------------------------------------------


def _reduce(values: torch.Tensor, op: str, group=None) -> torch.Tensor:
    d = _dist()
    if d is None:
        return values
    out = values.detach().to(torch.float64).cpu().clone()  # every rank reduces the same float64 values
    _guard(f"all_reduce({op})", d.all_reduce, out, getattr(d.ReduceOp, op), group)
    return out.to(values.dtype)


def all_sum(x):
    """Sum over the data-parallel ranks of a float, an int, a list of numbers or a tensor (returned as the same
    kind): over every rank, or under tensor parallelism over the dp ranks (a tp group's ranks hold the same value,
    counted once)."""
    if dp_size() == 1:
        return x
    return _apply(x, "SUM", _data_group())


def all_max(x):
    return _apply(x, "MAX")


def all_min(x):
    return _apply(x, "MIN")


def _apply(x, op: str, group=None):
    if world_size() == 1:
        return x
    if isinstance(x, torch.Tensor):
        return _reduce(x, op, group).to(x.device)
    if isinstance(x, (list, tuple)):
        out = _reduce(torch.tensor([float(v) for v in x], dtype=torch.float64), op, group).tolist()
        return [type(v)(o) for v, o in zip(x, out)]
    return type(x)(_reduce(torch.tensor([float(x)], dtype=torch.float64), op, group).item())


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (e.g. "my loss is finite"), so all ranks take the same branch."""
    return bool(all_min(1.0 if flag else 0.0) > 0.5)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (count, mean, unbiased variance) of `x` where `mask` is 1, over the rows of every rank.

    x, mask `(B, R)`; each rank sums its count, sum and sum of squared deviations from the global mean in float64,
    so the statistics are those of the concatenated global batch whatever the sharding."""
    m = mask.to(torch.float64)
    xd = x.to(torch.float64) * m
    count, total = all_sum(torch.stack([m.sum(), xd.sum()]))
    mean = total / count.clamp(min=1)
    sq = all_sum((((x.to(torch.float64) - mean) * m) ** 2).sum().reshape(1))[0]
    var = sq / (count - 1).clamp(min=1)
    return count, mean, var


def reduce_stats(parts: Sequence[tuple[dict, float]], sums: Sequence[str] = ()) -> dict[str, float]:
    """Global statistics from this rank's per-micro-batch `(stats, weight)` pairs: keys in `sums` are shares of a
    globally normalised quantity (a loss divided by the global token count) and are summed over micro-batches and
    ranks; the others are per-micro-batch means, averaged with weights `weight` (e.g. valid tokens). Every rank
    must pass the same keys."""
    keys = sorted({k for st, _ in parts for k in st})
    local = [sum(st.get(k, 0.0) * (1.0 if k in sums else w) for st, w in parts) for k in keys]
    totals = all_sum(local + [sum(w for _, w in parts)])
    weight = totals[-1]
    return {k: t if k in sums else (t / weight if weight else 0.0) for k, t in zip(keys, totals)}


def all_gather_objects(obj, *, data: bool = False) -> list:
    """`obj` from every rank, in rank order (picklable Python objects, e.g. token lists). `data`: one per
    data-parallel rank, in dp order (under tensor parallelism the ranks of a tp group hold the same items: its
    first rank's is kept)."""
    d = _dist()
    if d is None:
        return [obj]
    out = [None] * world_size()
    _guard("all_gather_object", d.all_gather_object, out, obj)
    return out[::_TP] if data else out


def all_gather_rows(t: torch.Tensor, pad_value: float = 0, *, data: bool = False) -> torch.Tensor:
    """The rows of `t` (B_r, ...) of every rank concatenated in rank order, `(sum B_r, ...)`; trailing dimensions
    are padded with `pad_value` to the largest over ranks. `data`: of every data-parallel rank (one rank per tp
    group, as `all_gather_objects`). At world size 1, `t` itself."""
    d = _dist()
    if d is None:
        return t
    shapes = all_gather_objects(tuple(t.shape))
    full = [max(s[i] for s in shapes) for i in range(t.dim())]
    padded = torch.full(full, pad_value, dtype=t.dtype, device=t.device)
    padded[tuple(slice(0, n) for n in t.shape)] = t
    parts = [torch.empty_like(padded) for _ in shapes]
    _guard("all_gather", d.all_gather, parts, padded)
    step = _TP if data else 1
    return torch.cat([p[:s[0]] for p, s in zip(parts[::step], shapes[::step])])


# --- global batches --------------------------------------------------------------------------------------------


def rank_slice(n: int, *, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of a global batch of `n` items (sizes differ by at most one): its dp rank's part
    (`dp_rank` of `dp_size`; every rank's own without tensor parallelism)."""
    r = dp_rank() if rank_ is None else rank_
    w = dp_size() if world is None else world
    return slice(r * n // w, (r + 1) * n // w)


def num_micro(n: int, micro_batch_size: int) -> int:
    """Micro-batches per rank for a global batch of `n`: the same on every rank (FSDP's collectives run once per
    forward and backward, so every rank must run as many), enough for the largest rank slice."""
    largest = -(-n // dp_size())
    return 1 if micro_batch_size <= 0 else max(1, -(-largest // micro_batch_size))


def micro_slices(n: int, micro_batch_size: int) -> list[slice]:
    """This rank's items of a global batch of `n` split into `num_micro(n, ...)` near-equal slices of the global
    index range; a rank with fewer items than micro-batches gets empty slices (it must still run a forward)."""
    own = rank_slice(n)
    k = num_micro(n, micro_batch_size)
    size = own.stop - own.start
    return [slice(own.start + i * size // k, own.start + (i + 1) * size // k) for i in range(k)]


def accumulate(batch: Sequence, loss_of: Callable[[Sequence, bool], torch.Tensor],
               micro_batch_size: int) -> torch.Tensor:
    """Forward and backward of this rank's part of the global `batch`, in micro-batches (gradient accumulation).

    `loss_of(items, real)` must divide by the *global* count of `batch` (tokens, pairs, ...), so the gradients
    summed over micro-batches and ranks are the one-process gradient of the whole batch. Every rank runs
    `num_micro(...)` forwards and backwards; a rank with too few items runs a stand-in item (`real=False`, whose
    loss is weighted 0: FSDP's collectives need every rank). Every micro-batch loss is backpropagated here; returns
    their detached sum (this rank's share of the batch loss), for the guarded step's finite check and the log."""
    total = None
    for sl in micro_slices(len(batch), micro_batch_size):
        items = batch[sl]
        loss = loss_of(items, True) if len(items) else loss_of(batch[:1], False) * 0.0
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def rank_parts(items: Sequence, batch_size: int) -> Iterator[tuple[Sequence, bool]]:
    """For evaluation: this rank's part of each global batch of `items`, as (part, real). Every rank yields as many
    parts; `real` is False for a stand-in (one item) on a rank that has none, whose result must be dropped."""
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        part = batch[rank_slice(len(batch))]
        yield (part, True) if len(part) else (batch[:1], False)


# --- sharded models ------------------------------------------------------------------------------------------


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if world_size() == 1:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds FSDP2-sharded modules or tensor-parallel (DTensor) parameters
    (`parallelize.parallelize` at world size > 1)."""
    if world_size() == 1:
        return False
    from torch.distributed.tensor import DTensor

    return bool(_fsdp_modules(model)) or any(isinstance(p, DTensor) for p in model.parameters())


# --- gradients -------------------------------------------------------------------------------------------------


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of `params` (sharded or not) to `max_norm`; returns the norm before clipping
    (NaN/Inf when a gradient is non-finite on any rank). At world size 1 this is `clip_grad_norm_`.

    A DTensor gradient's shard is held by world / (its number of shards) ranks (an FSDP shard of a norm's weight
    by each rank of its tp group, a tensor-parallel shard by each dp rank after FSDP's reduction): each holder adds
    its squares divided by that count, and the sum runs over every rank."""
    if world_size() == 1:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # a shard, or a replicated tensor
    sharded = sum((x.detach().double().pow(2).sum() / _holders(g) for g, x in zip(grads, local) if g is not x),
                  torch.zeros((), dtype=torch.float64))
    replicated = sum(float(x.detach().double().pow(2).sum()) for g, x in zip(grads, local) if g is x)
    total = (float(_reduce(sharded.reshape(1), "SUM")[0]) + replicated) ** 0.5
    if max_norm < float("inf") and total == total:
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for x in local:
                x.mul_(coef)
    return total


def _holders(t) -> int:
    """How many ranks hold each shard of DTensor `t`: the world size over its number of distinct shards."""
    shards = 1
    for i, p in enumerate(t.placements):
        if not p.is_replicate():  # Shard, or FSDP's _StridedShard of a tp shard (whose is_shard() is False)
            shards *= t.device_mesh.size(i)
    return world_size() // shards


def local_state_mib(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> float:
    """MiB of parameters and optimiser state this rank holds (its shards when sharded)."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = sum(nbytes(p) for m in models.values() for p in m.parameters())
    if optimizer is not None:
        total += sum(nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return total / 2**20


# --- checkpoints (DCP) and export ------------------------------------------------------------------------------


class _Bundle(nn.Module):
    """The models of one checkpoint under their names, so one optimiser over several models has one state dict."""

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        self.models = nn.ModuleDict(models)


def _state_dicts(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    bundle = _Bundle(models)
    state = {"model": get_model_state_dict(bundle)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(bundle, optimizer)
    return bundle, state


def save_state(path: str | Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Write `models`' parameters (and `optimizer`'s state) into directory `path` with DCP: every rank writes its
    own shards (`__<rank>_0.distcp`) and rank 0 the `.metadata`. Called by every rank on the same `path`."""
    import torch.distributed.checkpoint as dcp

    if not models:
        return
    _, state = _state_dicts(models, optimizer)
    with _single_process_quiet():
        _guard("checkpoint save", lambda: dcp.save(state, checkpoint_id=str(path), no_dist=world_size() == 1))


def load_state(path: str | Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Read a `save_state` directory into `models` (and `optimizer`) in place, at any world size: DCP reshards
    from the saved layout to this run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not models:
        return
    bundle, state = _state_dicts(models, optimizer)
    with _single_process_quiet():
        _guard("checkpoint load", lambda: dcp.load(state, checkpoint_id=str(path), no_dist=world_size() == 1))
    set_model_state_dict(bundle, state["model"])
    if optimizer is not None:
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        set_optimizer_state_dict(bundle, optimizer, state["optim"])
        for g, kw in zip(optimizer.param_groups, kernels):  # this run's kernels, not the writer's (a one-process
            g.update(kw)  # fused AdamW cannot step the mixed tensors of tensor parallelism)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists: that is world size 1, as intended."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors on rank 0 (empty elsewhere); every rank must call it.
    Non-persistent buffers such as rotary `inv_freq` are not in it (models rebuild them from their config)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
