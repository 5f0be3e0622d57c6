"""The rollout on a tensor-parallel model (`parallelize.tensor_parallel`): what `RolloutEngine` and
`teacher_forced_logprobs` do differently when the decoder is split over the ranks of a tp group.

A tp rank holds heads / tp query heads and kv_heads / tp key/value heads (its columns of q/k/v, its rows of o), its
MLP columns and V / tp rows of the lm_head; the hidden states are replicated (every rank computes them whole after
the row-parallel all-reduces). The rollout on it:

* keeps the K/V of the rank's own kv heads only: its cache is (layers, 2, blocks, block_size, kv_heads / tp,
  head_dim), 1/tp of one process's for the same blocks (`kv_heads`);
* computes this rank's logits (R, V / tp) of the rows that sample and all-gathers them over the group into (R, V)
  (`logits`): every rank holds the same bits, so the sampler (Philox keyed by a seed the group shares,
  `shared_seed`) draws the same tokens on every rank and the ranks' schedulers stay in step with no other exchange.
  The gathered tensor is one row of the vocabulary per sampled token (a decode step: one per running sequence);
  the (tokens, V) logits of a training batch are never formed (`ops.vocab_parallel`);
* never gathers the parameters over tp: FSDP's `parallelize.unsharded` gathers over the dp ranks only;
* on a mixture-of-experts model (Mixtral, Qwen3-MoE) each rank holds E / tp whole experts and the whole router: every
  rank routes every token the same way, so the routes the engine records (`Completion.routes`) are the same on every
  tp rank (and one process's); the layer's output is the ranks' experts' shares summed over the group.

A forward runs the tp group's collectives (the embedding's all-reduce, two per block, this gather): every rank of a
tp group calls `generate` with the same prompts and parameters, as it runs every other forward; dp groups decode
their own prompts, any number of steps.
"""
from __future__ import annotations

import torch


def tp_mesh(lm):
    """The 1-D tp DeviceMesh `lm`'s lm_head (or embedding) is split over, or None for a model not split by
    `parallelize.tensor_parallel`. A 2-D (dp, tp) mesh (FSDP's sharded parameters) gives its "tp" dimension."""
    from torch.distributed.tensor import DTensor

    head = lm.lm_head if lm.lm_head is not None else lm.embed
    w = head.weight
    if not isinstance(w, DTensor):
        return None
    mesh = w.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        return None
    return mesh if mesh.ndim == 1 else mesh["tp"]


def degree(lm) -> int:
    """The tp degree `lm` is split over (1: not split)."""
    mesh = tp_mesh(lm)
    return 1 if mesh is None else mesh.size()


def kv_heads(lm) -> int:
    """The key/value heads this rank computes and caches: num_kv_heads / tp, or 1 where tp is a multiple of them
    (each kv head replicated on tp / num_kv_heads ranks, `parallelize.tensor_parallel`)."""
    tp = degree(lm)
    return lm.num_kv_heads // tp if lm.num_kv_heads % tp == 0 else 1


def check(lm, what: str) -> None:
    """One-line refusals of what the rollout does not cover on a tp-split model."""
    if degree(lm) > 1 and lm.final_logit_softcap:
        raise NotImplementedError(f"{what}: a soft-capped model (final_logit_softcap {lm.final_logit_softcap}) "
                                  f"split over tensor-parallel ranks is not supported: use parallel.tp = 1")
    if degree(lm) > 1 and lm.lm_head is None:
        raise TypeError(f"{what}: {type(lm).__name__} has no lm_head: it is a backbone, it gives hidden states only")


def shared_seed(lm, seed: int) -> int:
    """`seed` as the first rank of `lm`'s tp group drew it (a broadcast over the group), so that every tp rank
    samples with the same key; `seed` itself for a model not split."""
    mesh = tp_mesh(lm)
    if mesh is None:
        return seed
    import torch.distributed as dist

    t = torch.tensor([seed], dtype=torch.int64, device=lm.device)
    group = mesh.get_group()
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_head(lm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's rows of the lm_head: weight (V / tp, hidden), bias (V / tp,) or None. Read inside
    `parallelize.unsharded` (or with no FSDP): FSDP's sharded parameters hold dp shards of them instead."""
    from torch.distributed.tensor import DTensor, Shard

    head = lm.lm_head
    w = head.weight
    if w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
        raise RuntimeError(f"rollout: the lm_head weight is laid out as {w.placements} over mesh "
                           f"{w.device_mesh.mesh_dim_names}, expected Shard(0) over the tp mesh: decode inside "
                           f"parallelize.unsharded(model), which gathers it over the dp ranks")
    b = head.bias
    assert b is None or not isinstance(b, DTensor) or tuple(b.placements) == (Shard(0),), b.placements
    return _local(w), _local(b)


def pack_head(lm, rows_hint: int) -> torch.Tensor | None:
    """This rank's lm_head rows reordered for oneDNN (`ops._onednn.pack`; None where it does not apply): the
    `DecoderLM.packed_head` of a tp-split model."""
    from rlhf_fast.ops import _onednn as onednn

    return onednn.pack(local_head(lm)[0], rows_hint)


def logits(lm, h: torch.Tensor, deterministic: bool, packed: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states h (R, hidden), replicated over the tp group -> float32 logits (R, V), the same bits on
    every rank: this rank's (R, V / tp) (through `packed`, `pack_head`'s, outside deterministic mode), all-gathered
    over the group in vocabulary order. `lm.logits(h, deterministic)` for a model not split."""
    mesh = tp_mesh(lm)
    if mesh is None:
        return lm.logits(h, deterministic)
    from torch.distributed import _functional_collectives as funcol

    from rlhf_fast.models.layers import linear
    from rlhf_fast.ops import _onednn as onednn

    w, b = local_head(lm)
    if packed is not None and not deterministic:
        z = onednn.linear(h.float(), packed, b)
    else:
        z = linear(h, w, b, deterministic).float()  # (R, V / tp)
    z = funcol.all_gather_single(z.contiguous(), 0, mesh.get_group())  # (tp * R, V / tp), rank-major
    r = h.shape[0]
    return z.view(mesh.size(), r, -1).transpose(0, 1).reshape(r, -1)  # (R, V)
