"""Token log-probabilities (and entropy) from hidden states and a vocab-parallel lm_head, never gathering the logits;
the PPO step on them (`vocab_parallel_ppo_loss`; `head_logprobs` / `head_ppo_loss` pick the plain or the split path
from a model's lm_head); and the vocab-parallel embedding lookup (`vocab_parallel_embedding`).

Under tensor parallelism (`rlhf_fast.parallelize.tensor_parallel`) each of the tp ranks of a group holds rows
[start, start + V/tp) of the lm_head weight, and the final hidden states whole (replicated). For each row of
hidden states, with z = (h W^T + b) / temperature over the whole vocabulary:

    log p(y) = z_y - logsumexp(z),    logsumexp(z) = M + log sum_r S_r exp(m_r - M),   M = max_r m_r
    entropy  = logsumexp(z) - E_p[z], E_p[z] = sum_r Z_r exp(m_r - M) / sum_r S_r exp(m_r - M)

where rank r computes, over its own vocabulary slice in chunks of columns with a running max, m_r = max z,
S_r = sum exp(z - m_r), Z_r = sum z exp(z - m_r), and z_y when it holds label y (0 elsewhere). Two all-reduces of
(N,)-sized statistics combine them (MAX of m, then SUM of the rescaled S, z_y and Z): the (N, V) logits exist
nowhere, and no rank ever holds more than an (N, chunk) block of its own. This is Megatron's vocab-parallel
cross-entropy, fused with the lm_head matmul as Liger's fused linear cross-entropy does.

Backward, per chunk of this rank's columns (the logits recomputed, p = exp(z - logsumexp)):

    d log p(y) / d z_k = 1[k = y] - p_k,        d entropy / d z_k = -p_k (z_k - E_p[z])

times 1 / temperature for the logits; d W_local = dz^T h and d b_local = sum dz stay local (this rank's rows),
d h = dz W_local is this rank's share of the whole vocabulary's sum and is all-reduced over the group, so every
rank carries the full gradient of the replicated hidden states back into the model.

At a group of one rank (None) no collective runs: the op is a plain chunked `linear_token_logprobs` (the tests
check it against `ops.reference` in float64 there, and at two ranks against the full weight).
"""
from __future__ import annotations

import torch

TARGET_CHUNK_ELEMS = 8 << 20  # logits per vocabulary chunk (N rows x C columns): about 32 MiB in fp32
MIN_CHUNK_COLS = 256  # a chunk's columns at least (long inputs: bigger chunks rather than thin GEMMs)


def _all_reduce(t: torch.Tensor, op: str, group) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, getattr(dist.ReduceOp, op), group)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv_temp: float,
            acc: torch.dtype) -> torch.Tensor:
    """z = (hidden @ weight.T + bias) * inv_temp in the accumulation dtype: (N, H), (C, H) -> (N, C), the matmul in
    hidden's dtype whatever autocast is on (the fused ops' logits ignore it too)."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = (hidden @ weight.to(hidden.dtype).t()).to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    return z * inv_temp if inv_temp != 1.0 else z


class _VocabParallelLogprobs(torch.autograd.Function):
    """hidden (N, H) (rows to score only), weight (Vl, H), bias (Vl,) | None, labels (N,) global ids ->
    logp (N,), entropy (N,) in the accumulation dtype (fp64 for fp64 inputs, else fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start, inv_temp, group, cols, with_entropy):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n, vl = hidden.shape[0], weight.shape[0]
        local = labels - vocab_start  # (N,) the label's column in this rank's slice, if it holds it
        m = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)  # running max
        s, zs, tgt = (torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(3))
        for c0 in range(0, vl, cols):
            c1 = min(c0 + cols, vl)
            z = _logits(hidden, weight[c0:c1], None if bias is None else bias[c0:c1], inv_temp, acc)  # (N, C)
            new = torch.maximum(m, z.max(-1).values)
            e = torch.exp(z - new[:, None])  # (N, C)
            rescale = torch.exp(m - new)
            s = s * rescale + e.sum(-1)
            if with_entropy:
                zs = zs * rescale + (e * z).sum(-1)
            m = new
            inside = (local >= c0) & (local < c1)
            picked = z.gather(1, (local - c0).clamp(0, c1 - c0 - 1)[:, None])[:, 0]
            tgt = torch.where(inside, picked, tgt)
        big = m.clone()
        if n:
            _all_reduce(big, "MAX", group)  # (N,) the global max
        f = torch.exp(m - big)
        stats = torch.stack((s * f, tgt, zs * f))  # (3, N): rescaled sums, target logit (held by one rank), sum z e
        if n:
            _all_reduce(stats, "SUM", group)
        lse = big + torch.log(stats[0])
        mean_z = stats[2] / stats[0]
        ctx.save_for_backward(hidden, weight, bias, local, lse, mean_z)
        ctx.inv_temp, ctx.group, ctx.cols, ctx.with_entropy = inv_temp, group, cols, with_entropy
        return stats[1] - lse, lse - mean_z

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, local, lse, mean_z = ctx.saved_tensors
        acc = lse.dtype
        n, vl = hidden.shape[0], weight.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(acc)
        use_ent = ctx.with_entropy and g_ent is not None
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)  # (N, H)
        grad_w = torch.empty_like(weight)  # (Vl, H)
        grad_b = None if bias is None else torch.empty_like(bias)
        for c0 in range(0, vl, ctx.cols):
            c1 = min(c0 + ctx.cols, vl)
            w = weight[c0:c1].to(hidden.dtype)  # (C, H): an autocast copy's dtype may differ from hidden's
            z = _logits(hidden, w, None if bias is None else bias[c0:c1], ctx.inv_temp, acc)  # (N, C)
            p = torch.exp(z - lse[:, None])
            dz = -g_logp[:, None] * p  # d logp / d z = onehot - p
            if use_ent:
                dz = dz - g_ent.to(acc)[:, None] * p * (z - mean_z[:, None])  # d entropy / d z = -p (z - E z)
            inside = (local >= c0) & (local < c1)
            dz.scatter_add_(1, (local - c0).clamp(0, c1 - c0 - 1)[:, None], torch.where(inside, g_logp, 0.0)[:, None])
            if ctx.inv_temp != 1.0:
                dz = dz * ctx.inv_temp  # d z / d logits
            dl = dz.to(hidden.dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                grad_h += (dl @ w).to(acc)
                grad_w[c0:c1] = (dl.t() @ hidden).to(weight.dtype)
            if grad_b is not None:
                grad_b[c0:c1] = dz.sum(0).to(bias.dtype)
        if n:
            _all_reduce(grad_h, "SUM", ctx.group)  # every vocabulary slice's share: the replicated input's gradient
        return grad_h.to(hidden.dtype), grad_w, grad_b, None, None, None, None, None, None


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                            vocab_start: int = 0, group=None, bias: torch.Tensor | None = None,
                            temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                            chunk_size: int | None = None):
    """Log-probabilities of `labels` under logits `hidden @ W^T + b` whose vocabulary rows are split over the ranks
    of `group`, this rank holding rows [vocab_start, vocab_start + V_local) as `weight` (and `bias`).

    Every rank of `group` must call it with the same `hidden` and `labels` (they are replicated under tensor
    parallelism); each gets the same log-probs. Rows labelled `ignore_index` are dropped before any matmul (their
    log-prob and entropy are 0).

    Args:
        hidden: (..., H) float32/bfloat16/float16/float64, the final hidden states, whole on every rank.
        weight: (V_local, H) same dtype, this rank's rows of the lm_head weight (a tensor of its own: its gradient
            is this rank's).
        labels: (...) int64/int32, global ids in [0, V_local * group size), or `ignore_index`.
        vocab_start: the global id of `weight`'s first row.
        group: the tensor-parallel process group; None: one rank holds the whole vocabulary (no collective).
        bias: (V_local,) or None.
        temperature: the logits are divided by it.
        return_entropy: also return the entropy of each row's whole-vocabulary distribution.
        chunk_size: columns of this rank's slice per chunk (memory knob; default ~32 MiB of fp32 logits).
    Returns:
        logp (...) float32 (float64 for float64 inputs), or (logp, entropy). Differentiable w.r.t. hidden, weight
        and bias.
    """
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"vocab_parallel_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"labels {tuple(labels.shape)} do not match ((..., H), (V_local, H), (...))")
    if not temperature > 0:
        raise ValueError(f"vocab_parallel_logprobs: temperature must be > 0, got {temperature}")
    ranks = 1 if group is None else _group_size(group)
    vocab = weight.shape[0] * ranks
    flat = labels.reshape(-1).to(torch.int64)
    keep = (flat != ignore_index).nonzero()[:, 0]  # (N,) the scored rows
    lab = flat.index_select(0, keep)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab):
        raise ValueError(f"vocab_parallel_logprobs: labels must be in [0, {vocab}) or ignore_index {ignore_index}")
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (N, H)
    cols = chunk_size or max(MIN_CHUNK_COLS, TARGET_CHUNK_ELEMS // max(1, h.shape[0]))
    lp, ent = _VocabParallelLogprobs.apply(h, weight, bias, lab, int(vocab_start), 1.0 / temperature, group,
                                           int(cols), return_entropy)
    out_dtype = lp.dtype
    logp = torch.zeros(flat.shape, dtype=out_dtype, device=hidden.device).index_put((keep,), lp)
    if not return_entropy:
        return logp.view(labels.shape)
    entropy = torch.zeros(flat.shape, dtype=out_dtype, device=hidden.device).index_put((keep,), ent)
    return logp.view(labels.shape), entropy.view(labels.shape)


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


class _VocabParallelEmbedding(torch.autograd.Function):
    """ids (...) global, weight (Vl, H) this rank's rows -> (..., H) the whole table's rows, on every rank."""

    @staticmethod
    def forward(ctx, ids, weight, vocab_start, group, padding_idx):
        vl = weight.shape[0]
        local = ids - vocab_start
        mine = (local >= 0) & (local < vl)  # (...) the ids whose rows this rank holds
        local = torch.where(mine, local, 0)
        out = torch.nn.functional.embedding(local, weight).masked_fill(~mine[..., None], 0.0)  # (..., H)
        _all_reduce(out, "SUM", group)  # one rank's row + zeros: exactly the row
        pad = None if padding_idx is None else padding_idx - vocab_start
        ctx.save_for_backward(local, mine)
        ctx.vl, ctx.pad = vl, pad if pad is not None and 0 <= pad < vl else None
        return out

    @staticmethod
    def backward(ctx, grad):
        local, mine = ctx.saved_tensors
        g = torch.zeros(ctx.vl, grad.shape[-1], dtype=grad.dtype, device=grad.device)  # (Vl, H)
        g.index_add_(0, local[mine], grad[mine])  # the output's gradient is whole on every rank: take our rows
        if ctx.pad is not None:
            g[ctx.pad] = 0.0  # nn.Embedding's padding_idx: that row gets no gradient
        return None, g, None, None, None


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, *, vocab_start: int = 0, group=None,
                             padding_idx: int | None = None) -> torch.Tensor:
    """`F.embedding(ids, W, padding_idx)` for a table whose vocabulary rows are split over the ranks of `group`,
    this rank holding rows [vocab_start, vocab_start + V_local) as `weight`: each rank looks up the ids it holds
    (zeros for the others), one all-reduce sums them, so every rank gets the whole lookup, bitwise. The backward
    needs no collective (the output's gradient is the same on every rank): this rank adds it into its rows.

    ids (...) int64 global ids (the same on every rank); weight (V_local, H); padding_idx: a global id whose row
    gets no gradient, as nn.Embedding's. Returns (..., H) in weight's dtype."""
    return _VocabParallelEmbedding.apply(ids, weight, int(vocab_start), group, padding_idx)


def _split_head(lm_head: torch.nn.Module, what: str):
    """(local weight (V / tp, H), local bias | None, vocab_start, group) of a lm_head `tensor_parallel` split over
    the vocabulary, or None for a plain one."""
    from torch.distributed.tensor import DTensor, Shard

    w, b = lm_head.weight, lm_head.bias
    if not isinstance(w, DTensor):
        return None
    mesh = w.device_mesh
    if mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
        raise RuntimeError(f"{what}: the lm_head weight is laid out as {w.placements} over mesh "
                           f"{mesh.mesh_dim_names}: read it after the model's forward (FSDP gathers it over the data "
                           f"ranks then), and split it over the vocabulary (`parallelize.tensor_parallel`)")
    local = w.to_local()  # (V / tp, H): its gradient is the DTensor's shard
    return local, None if b is None else b.to_local(), mesh.get_local_rank() * local.shape[0], mesh.get_group()


def _refuse_split(what: str, softcap: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> None:
    if softcap:
        raise NotImplementedError(f"{what}: softcap={softcap} (a soft-capped model, Gemma 2/3) on a lm_head split "
                                  f"over the vocabulary is not supported: train it with parallel.tp=1")
    if top_k or top_p < 1.0:
        raise NotImplementedError(f"{what}: top_k={top_k}, top_p={top_p} (a truncated sampling distribution) on a "
                                  f"lm_head split over the vocabulary is not supported: sample with top_k=0 and "
                                  f"top_p=1.0, or train with parallel.tp=1")


def head_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, *,
                  ignore_index: int = -100, temperature: float = 1.0, return_entropy: bool = False,
                  softcap: float = 0.0, **support):
    """Log-probabilities of `labels` under a model's `lm_head` (an nn.Linear) from `hidden` (..., H), reading its
    weight after the model's forward (an FSDP root has gathered it then): `ops.linear_token_logprobs` on a plain
    weight; `vocab_parallel_logprobs` on this rank's rows when `parallelize.tensor_parallel` split it over the
    vocabulary (a DTensor sharded on dim 0 of a 1-D tp mesh). Same returns as `ops.linear_token_logprobs`. `softcap`:
    the model's final logit soft-cap (`DecoderLM.final_logit_softcap`); `support`: `linear_token_logprobs`'s top_k,
    top_p, support and support_threshold (both refused on a vocabulary-split head unless off)."""
    split = _split_head(lm_head, "head_logprobs")
    if split is None:
        from rlhf_fast.ops.logprobs import linear_token_logprobs

        return linear_token_logprobs(hidden, lm_head.weight, labels, bias=lm_head.bias, temperature=temperature,
                                     ignore_index=ignore_index, return_entropy=return_entropy, softcap=softcap,
                                     **support)
    _refuse_split("head_logprobs", softcap, support.get("top_k", 0), support.get("top_p", 1.0))
    local, bias, start, group = split
    return vocab_parallel_logprobs(hidden, local, labels, vocab_start=start, group=group, bias=bias,
                                   temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)


def head_ppo_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, old_logp: torch.Tensor,
                  advantages: torch.Tensor, mask: torch.Tensor, **options):
    """The PPO step from hidden states under a model's `lm_head`, read after the forward: `ops.ppo_loss_from_hidden`
    on a plain weight (and bias), `vocab_parallel_ppo_loss` on this rank's rows of one `tensor_parallel` split over
    the vocabulary. `options`: `ops.ppo_loss_from_hidden`'s keyword arguments but `bias` (the head's). Same returns
    (loss, `ops.FusedPPOStats`)."""
    split = _split_head(lm_head, "head_ppo_loss")
    if split is None:
        from rlhf_fast.ops.fused_ppo import ppo_loss_from_hidden

        return ppo_loss_from_hidden(hidden, lm_head.weight, labels, old_logp, advantages, mask, bias=lm_head.bias,
                                    **options)
    local, bias, start, group = split
    return vocab_parallel_ppo_loss(hidden, local, labels, old_logp, advantages, mask, vocab_start=start,
                                   group=group, bias=bias, **options)


def vocab_parallel_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                            vocab_start: int = 0, group=None, bias: torch.Tensor | None = None, clip=None,
                            agg="token-mean", kl=None, entropy_coef: float = 0.0, temperature: float = 1.0,
                            is_weights: torch.Tensor | None = None, rollout_logp: torch.Tensor | None = None,
                            rollout_correction=None, softcap: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                            support: str = "recompute", support_threshold: torch.Tensor | None = None,
                            chunk_size: int | None = None, token_stats: bool = False):
    """`ops.ppo_loss_from_hidden` (same arguments, loss and `FusedPPOStats`) for a lm_head whose vocabulary rows are
    split over the ranks of `group`, this rank holding rows [vocab_start, vocab_start + V_local) as `weight`
    (and `bias`). Every rank of `group` passes the same hidden (batch, T, H) and per-token tensors (batch, T).

        loss = agg(pg(logp)) + kl.coef * agg(kl_penalty(logp, kl.ref_logp)) - entropy_coef * agg(H)

    with logp and H of each valid token from `vocab_parallel_logprobs` (per-shard max, sum of exponentials, target
    logit and sum of z exp(z): three (tokens,)-sized all-reduces; the (tokens, V) logits exist nowhere) and the
    terms on them by the same pure functions as the fused step (`ops.losses.policy_loss_tokens`, `ops.kl_penalty`,
    `PPOAgg.token_weights`). Valid tokens: mask (after the rollout correction's keep mask) with a finite old_logp,
    advantage, ref_logp and importance weight. `old_logp=None`: the on-policy step (the log ratio exactly 0, its
    gradient that of exp(logp - sg(logp))); `token_stats`: the per-token log-probs and entropies in the stats, as the
    fused step's. Not covered on a split head: a soft-cap and top-k / top-p support (NotImplementedError)."""
    from rlhf_fast.ops.fused_ppo import FusedPPOStats
    from rlhf_fast.ops.kl import kl_penalty
    from rlhf_fast.ops.loss_spec import PPOAgg, PPOClip
    from rlhf_fast.ops.losses import policy_loss_tokens, token_advantages
    from rlhf_fast.ops.rollout_correction import apply_rollout_correction

    _refuse_split("vocab_parallel_ppo_loss", softcap, top_k, top_p)
    clip = PPOClip() if clip is None else clip
    agg = PPOAgg.of(agg)
    if support != "recompute" and support_threshold is not None:
        raise NotImplementedError("vocab_parallel_ppo_loss: a replayed support needs top_k / top_p (not supported "
                                  "on a split head)")
    if old_logp is None and rollout_logp is not None:
        raise ValueError("rollout_logp needs old_logp (the trainer's log-probs of the behaviour policy); old_logp=None "
                         "is the on-policy step, with nothing to correct")
    advantages = token_advantages(advantages, mask)
    mask, is_weights, corr, dropped = apply_rollout_correction(old_logp, rollout_logp, mask, rollout_correction,
                                                               is_weights)
    ref_logp = None if kl is None else kl.ref_logp
    finite = torch.isfinite(advantages)
    for t in (old_logp, ref_logp, is_weights):
        if t is not None:
            finite &= torch.isfinite(t)
    valid = mask.bool() & finite  # (batch, T)
    nonfinite = (mask.bool() & ~finite).sum()
    lab = torch.where(valid, labels.to(torch.int64), -100)  # only the valid tokens reach a matmul
    logp, ent = vocab_parallel_logprobs(hidden, weight, lab, vocab_start=vocab_start, group=group, bias=bias,
                                        temperature=temperature, return_entropy=True, chunk_size=chunk_size)
    isw = None if is_weights is None else is_weights.detach().to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp  # on-policy: logp - sg(logp) = 0 exactly
    pg, st = policy_loss_tokens(logp, old, advantages.to(logp.dtype), valid, isw, clip, agg)
    pg = pg.to(logp.dtype)
    kl_val = torch.zeros_like(pg)
    if kl is not None:
        kl_val = agg.aggregate(kl_penalty(logp, ref_logp.to(logp.dtype), kl.kind), valid)
    entropy = agg.aggregate(ent, valid)
    loss = pg + (0.0 if kl is None else float(kl.coef)) * kl_val - float(entropy_coef) * entropy
    stats = FusedPPOStats(pg.detach(), kl_val.detach(), entropy.detach(),
                          *(t.detach().to(logp.dtype) for t in (st.clip_frac, st.approx_kl, st.ratio_mean,
                                                                 st.ratio_min, st.ratio_max)),
                          nonfinite + dropped, corr,
                          *((logp.detach(), ent.detach()) if token_stats else (None, None)))  # 0 off the valid tokens
    return loss, stats
