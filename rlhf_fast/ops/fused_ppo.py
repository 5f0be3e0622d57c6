"""The fused PPO step: from the policy's last hidden states and lm_head straight to the PPO loss.

    loss = agg(pg) + kl.coef * agg(kl_penalty(logp, kl.ref_logp, kl.kind)) - entropy_coef * agg(H)

with pg the clipped surrogate of `ppo_policy_loss` (Schulman et al. 2017, eq. 7; optional dual clip), kl one of the
`kl_penalty` estimators and H the policy's entropy, all per token and aggregated by the same `agg`. Since every
term is a weighted sum over tokens whose weights (`agg.token_weights`) are known before the first chunk, the
forward pass goes chunk by chunk through valid tokens only: logits = h @ W.T (2THV flops), log-probs and entropy
(row kernel), the per-token loss and its derivative w.r.t. logp (by calling `ppo_policy_loss` with token weights
folded into the advantages, which the surrogate is positively homogeneous in, and `kl_penalty`), dlogits (row
kernel, in place) and dhidden / dweight (4THV flops). The backward pass only scales them by the upstream gradient:
6THV flops in all instead of 8THV, and never more than one (chunk, V) logits buffer.

With `clip.level="sequence"` (GSPO) or `"sequence-sum"` every token of a row needs the row's mean (sum) log ratio
before its loss is known, so a first pass computes the valid tokens' log-probs (2THV flops more, no extra memory
beyond (M,) floats); at the sequence-sum level it also gives each row's summed policy-gradient derivative.
Per-token importance weights multiply the policy-gradient term only (not the KL or entropy terms), as verl and TRL
do; (batch,) advantages are broadcast over each row.

Tokens whose old_logp, advantage, importance weight or ref_logp is NaN/Inf are dropped (as `ppo_policy_loss` does)
and counted in `stats.nonfinite`.

`old_logp=None` is the on-policy step (the old policy is this step's, detached: TRL's GRPO with one iteration per
generation): the log ratio is exactly 0 at every level (ratio 1, its gradient that of exp(logp - sg(logp))), with
no pass for the old log-probs. `token_stats=True` also returns the per-token log-probs and entropies the chunks
computed anyway (`stats.token_logp`, `stats.token_entropy`, detached), so a caller's metrics need no second
lm_head pass.

A final logit soft-cap (`softcap` > 0, Gemma 2/3) is applied by the row kernels to each chunk's logits, before the
temperature (z = c tanh(x / c) / T), and its derivative enters dlogits; the support selection sees the capped z.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast.backend import forced_backend, register_op, select, use_backend
from rlhf_fast.ops import _checks
from rlhf_fast.ops._linear_chunked import (accumulate_grads, chunk_rows_for, iter_chunks, native_rows_bwd,
                                           native_rows_fwd, torch_rows_bwd, torch_rows_fwd)
from rlhf_fast.ops.kl import kl_penalty
from rlhf_fast.ops.loss_spec import KLTerm, PPOAgg, PPOClip, RolloutCorrection
from rlhf_fast.ops.losses import policy_loss_tokens, token_advantages
from rlhf_fast.ops.rollout_correction import RolloutCorrectionStats, apply_rollout_correction
from rlhf_fast.ops.support import ChunkSupport, check_softcap, check_support

register_op("ppo_loss_from_hidden", triton=True, native_cpu="token_logprobs_fwd_cpu")
TOKEN_SUM = PPOAgg("token-sum")


class FusedPPOStats(NamedTuple):
    """Detached 0-d tensors over this call's valid tokens."""

    policy_loss: torch.Tensor  # agg(pg), the clipped surrogate alone
    kl: torch.Tensor  # agg(kl) before kl_coef (0 without ref_logp)
    entropy: torch.Tensor  # agg(H) before entropy_coef
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor  # mean(r - 1 - log r)
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    nonfinite: torch.Tensor  # int64: masked-in tokens dropped for a NaN/Inf old_logp / advantage / ref_logp / weight
    #                          (/ rollout_logp)
    rollout_correction: RolloutCorrectionStats | None = None  # given rollout_logp: the rollout-vs-trainer stats
    token_logp: torch.Tensor | None = None  # token_stats=True: (batch, T) this step's log-probs, 0 off the valid
    #                                         tokens
    token_entropy: torch.Tensor | None = None  # token_stats=True: (batch, T) this step's entropies (0 off them)


def _loss_backend(device) -> str | None:
    """The backend for the inner ppo_policy_loss / kl_penalty calls: the forced one where they have it, else auto."""
    try:
        select("ppo_policy_loss", device)
        select("kl_penalty", device)
    except RuntimeError:  # e.g. "native" forced for the fused op: the loss ops have no native kernel
        return "torch"
    return None if forced_backend() is None else forced_backend()


class _FusedPPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_logp, adv, ref_logp, isw, w, spread, cfg):
        # hidden (M, H) valid tokens only; weight (V, H); bias (V,) | None
        # labels, old_logp (the log ratio itself where lr_given: the sequence levels, on-policy), adv,
        # ref_logp | None, isw | None, w: (M,)
        # spread: (M,) d pg / d logp of the sequence-sum level (each row's summed derivative), or None
        clip, kl_coef, kl_kind, entropy_coef, inv_temp, chunk_size, rows_fwd, rows_bwd, cut, softcap, lr_given = cfg
        m, vocab, cd = hidden.shape[0], weight.shape[0], w.dtype
        dev = hidden.device
        tok_logp, tok_lse, tok_ent = (torch.empty(m, dtype=cd, device=dev) for _ in range(3))  # (M,) per token
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=cd, device=dev) if ctx.needs_input_grad[1] else None
        db = torch.zeros(vocab, dtype=cd, device=dev) if ctx.needs_input_grad[2] else None
        zero = torch.zeros((), dtype=cd, device=dev)
        pg_sum, kl_sum, ent_sum, clipped, akl, ratio_sum = zero, zero, zero, zero, zero, zero
        rmin = torch.full((), float("inf"), dtype=cd, device=dev)
        rmax = torch.full((), float("-inf"), dtype=cd, device=dev)
        ones = torch.ones(1, min(m, chunk_rows_for(chunk_size, m, vocab)), dtype=torch.bool, device=dev)
        for start, rows, hc, logits in iter_chunks(hidden, weight, bias, chunk_rows_for(chunk_size, m, vocab),
                                                   fixed_tiles=False):
            sl = slice(start, start + rows)
            logp, lse, ent = tok_logp[sl], tok_lse[sl], tok_ent[sl]
            thr = cut(logits, sl)  # (rows,) support thresholds (top-k / top-p), or None
            rows_fwd(logits, labels[sl], inv_temp, -1, logp, lse, ent, thr, softcap)
            with torch.enable_grad(), use_backend(_loss_backend(dev)):
                lp = logp.detach().requires_grad_(True)
                # weights folded into the advantages: pg(A * w) = w * pg(A) for w >= 0
                pg, st = policy_loss_tokens(lp[None], old_logp[None, sl].to(cd), (adv[sl] * w[sl])[None].to(cd),
                                            ones[:, :rows], None if isw is None else isw[None, sl], clip, TOKEN_SUM,
                                            lr_given=lr_given)
                terms = [pg] if spread is None else []  # sequence-sum: pg's derivative is precomputed
                if ref_logp is not None:
                    kl = (kl_penalty(lp, ref_logp[sl].to(cd), kl_kind) * w[sl]).sum()
                    terms.append(kl_coef * kl)
                    kl_sum = kl_sum + kl.detach()
                dlogp = torch.autograd.grad(sum(terms), lp)[0] if terms else torch.zeros_like(lp)
                if spread is not None:
                    dlogp = dlogp + spread[sl]
            pg_sum = pg_sum + pg.detach()
            ent_sum = ent_sum + (ent * w[sl]).sum()
            clipped, akl = clipped + st.clip_frac * rows, akl + st.approx_kl * rows
            ratio_sum = ratio_sum + st.ratio_mean * rows
            rmin, rmax = torch.minimum(rmin, st.ratio_min), torch.maximum(rmax, st.ratio_max)
            rows_bwd(logits, labels[sl], lse, ent, dlogp.contiguous(), (-entropy_coef * w[sl]).contiguous(),
                     inv_temp, -1, logits, thr, softcap)
            accumulate_grads(logits, hc, weight, dh[sl] if dh is not None else None, dw, db)
        ctx.grads = (dh, dw, db)  # intermediates, scaled in place by the backward pass
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        loss = pg_sum + kl_coef * kl_sum - entropy_coef * ent_sum
        n = max(m, 1)
        one = torch.ones((), dtype=cd, device=dev)
        stats = (pg_sum, kl_sum, ent_sum, clipped / n, akl / n, ratio_sum / n if m else one,
                 rmin if m else one, rmax if m else one, tok_logp, tok_ent)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, g_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("ppo_loss_from_hidden: backward can run only once per forward (retain_graph is not "
                               "supported: the gradients are computed in the forward pass and scaled in place)")
        dh, dw, db = ctx.grads
        ctx.grads = None
        dhidden = dh.mul_(g_loss.to(dh.dtype)) if dh is not None else None
        dweight = dw.mul_(g_loss.to(dw.dtype)).to(ctx.dtypes[0]) if dw is not None else None
        dbias = db.mul_(g_loss.to(db.dtype)).to(ctx.dtypes[1]) if db is not None else None
        return dhidden, dweight, dbias, None, None, None, None, None, None, None, None


def _sequence_sum_grad(logp, seq_lr, adv, isw, w, row, n_rows, clip) -> torch.Tensor:
    """(M,) d pg / d logp at the sequence-sum level: the row sum of the per-token (stop-gradient) derivatives, on
    every token of the row (d exp(sum lr) / d logp_t = exp(sum lr) for all t)."""
    with torch.enable_grad(), use_backend(_loss_backend(logp.device)):
        lp = logp.detach().requires_grad_(True)
        ones = torch.ones(1, lp.shape[0], dtype=torch.bool, device=lp.device)
        pg, _ = policy_loss_tokens(lp[None], seq_lr[None], (adv * w)[None].to(lp.dtype), ones,
                                   None if isw is None else isw[None], clip, TOKEN_SUM, lr_given=True)
        (g,) = torch.autograd.grad(pg, lp)
    return torch.zeros(n_rows, dtype=g.dtype, device=g.device).index_add_(0, row, g)[row]


def _valid_logp(h, weight, bias, labels, inv_temp, chunk_size, rows_fwd, cd, cut, softcap) -> torch.Tensor:
    """(M,) log-probs of the valid tokens, through the same chunks and row kernel as `_FusedPPO` (no gradient)."""
    m, vocab = h.shape[0], weight.shape[0]
    logp = torch.empty(m, dtype=cd, device=h.device)
    lse, ent = torch.empty_like(logp), torch.empty_like(logp)
    with torch.no_grad():
        for start, rows, _, logits in iter_chunks(h, weight, bias, chunk_rows_for(chunk_size, m, vocab),
                                                  fixed_tiles=False):
            sl = slice(start, start + rows)
            rows_fwd(logits, labels[sl], inv_temp, -1, logp[sl], lse[sl], ent[sl], cut(logits, sl), softcap)
    return logp


def _check(hidden, weight, bias, labels, mask, per_token: dict) -> None:
    """hidden (batch, T, H), weight (V, H), bias (V,) | None; labels, mask and the float `per_token` tensors
    (name -> tensor) (batch, T); every tensor on hidden's device."""
    _checks.check_float("hidden", hidden, ndim=3)
    _checks.check_float("weight", weight, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}; got {_checks.desc(weight)}")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V >= 1, {hidden.shape[-1]}); got {_checks.desc(weight)}")
    if bias is not None:
        _checks.check_float("bias", bias, ndim=1)
        if bias.dtype != hidden.dtype or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be ({weight.shape[0]},) in {hidden.dtype}; got {_checks.desc(bias)}")
    _checks.check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    _checks.check_mask("mask", mask)
    for n, t in per_token.items():
        _checks.check_float(n, t)
    named = {"labels": labels, "mask": mask, **per_token}
    for n, t in named.items():
        if t.shape != hidden.shape[:2]:
            raise ValueError(f"{n} must have shape {tuple(hidden.shape[:2])} (hidden's (batch, T)); "
                             f"got {_checks.desc(t)}")
    _checks.check_same_device(["hidden", "weight", "bias", *named], [hidden, weight, bias, *named.values()])
    bad = mask.bool() & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) wherever mask is 1; found values such as "
                         f"{labels[bad][:3].tolist()} ({_checks.desc(labels)})")


def _check_options(clip, kl, temperature, chunk_size, softcap) -> None:
    if not isinstance(clip, PPOClip):
        raise TypeError(f"clip must be a PPOClip, got {type(clip).__name__}")
    if kl is not None and not isinstance(kl, KLTerm):
        raise TypeError(f"kl must be a KLTerm or None, got {type(kl).__name__}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_softcap(softcap)


def ppo_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         old_logp: torch.Tensor | None,
                         advantages: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                         clip: PPOClip = PPOClip(), agg: PPOAgg | str = "token-mean", kl: KLTerm | None = None,
                         entropy_coef: float = 0.0, temperature: float = 1.0, chunk_size: int | None = None,
                         top_k: int = 0, top_p: float = 1.0, support: str = "recompute",
                         support_threshold: torch.Tensor | None = None,
                         is_weights: torch.Tensor | None = None, rollout_logp: torch.Tensor | None = None,
                         rollout_correction: RolloutCorrection | None = None,
                         softcap: float = 0.0, token_stats: bool = False) -> tuple[torch.Tensor, FusedPPOStats]:
    """PPO loss straight from hidden states, without materialising the (batch, T, V) logits.

    Args:
        hidden: (batch, T, H) float32/bfloat16/float16/float64, hidden states at the positions that predict labels.
        weight: (V, H) same dtype, the lm_head.
        labels: (batch, T) int64, the sampled response tokens (any value where mask is 0).
        old_logp: (batch, T) float, log-probs under the rollout policy; or None: on-policy, the old policy is this
            step's own (detached), so the log ratio is 0 at every token and level (ratio exactly 1) and no pass
            computes old log-probs (TRL's GRPO with one iteration per generation). Not with `rollout_logp`.
        advantages: (batch, T) float, or (batch,) for one advantage per sequence (GRPO, RLOO), broadcast.
        mask: (batch, T) 0/1 response mask.
        bias: (V,) same dtype, the lm_head's bias, or None.
        clip: `PPOClip(low, high, dual, level)`; level "sequence" is GSPO's sequence ratio.
        agg: an aggregation mode or `PPOAgg(mode, num_tokens, num_seqs)`, applied to every term.
        kl: `KLTerm(ref_logp (batch, T), coef, kind)` for a KL-in-loss term (log ratio clamped to [-20, 20]), or
            None (no KL term).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        temperature: the logits are divided by it (use the rollout's sampling temperature).
        softcap: the policy's final logit soft-cap c (Gemma 2/3 `final_logit_softcapping`): the logits become
            c * tanh(logits / c) before the temperature, with its derivative in the gradient; 0: off.
        top_k, top_p: the rollout's (0 / 1.0: off): logp and entropy are then those of the truncated, renormalised
            distribution it sampled from (temperature, then top-k, then top-p; the label always kept; gradients
            through the kept logits); see `token_logprobs`. Each chunk's thresholds come from a selection pass over
            its logits.
        support: "recompute" (default: the support from this step's logits) or "replay" (the rollout's recorded
            `support_threshold` (batch, T), in soft_cap(logits) / temperature units); as in `token_logprobs`.
        chunk_size: tokens per chunk (memory/speed knob).
        is_weights: (batch, T) per-token importance weights of the policy-gradient term (no gradient), or None.
        rollout_logp: (batch, T) the rollout engine's log-probs, or None; with it, old_logp is the trainer's and
            `rollout_correction` (a `RolloutCorrection`; None: mode "none", statistics only) weights and masks the
            tokens as in `ppo_policy_loss` (the weights multiply is_weights, the policy-gradient term only; dropped
            tokens leave every term), its stats in `stats.rollout_correction`.
        token_stats: also return this step's per-token log-probs and entropies (of the same, possibly truncated,
            distribution the loss uses; no gradient) as `stats.token_logp` / `stats.token_entropy` (batch, T) in the
            compute dtype, 0 where a token is masked out or dropped (`stats.nonfinite`): what the chunks compute
            anyway, so metrics need no second lm_head pass. Off: both None.
    The policy-gradient term is exactly `ppo_policy_loss(logp, old_logp, advantages, mask, clip=clip, agg=agg,
    is_weights=is_weights)` on this step's logp (see there for the formulas and the peers' equivalents).
    Returns:
        (loss: 0-d float32 (float64 for float64 hidden), differentiable w.r.t. hidden, weight and bias;
         stats: FusedPPOStats).
    """
    agg = PPOAgg.of(agg)
    _check_options(clip, kl, temperature, chunk_size, softcap)
    check_support(top_k, top_p, support, support_threshold, labels.shape, hidden.device)
    ref_logp = None if kl is None else kl.ref_logp
    on_policy = old_logp is None
    if on_policy and rollout_logp is not None:
        raise ValueError("rollout_logp needs old_logp (the trainer's log-probs of the behaviour policy); old_logp=None "
                         "is the on-policy step, with nothing to correct")
    advantages = token_advantages(advantages, mask)
    per_token = {**({} if on_policy else {"old_logp": old_logp}), "advantages": advantages,
                 **({} if kl is None else {"kl.ref_logp": ref_logp}),
                 **({} if is_weights is None else {"is_weights": is_weights})}
    _check(hidden, weight, bias, labels, mask, per_token)
    mask, is_weights, corr, dropped = apply_rollout_correction(old_logp, rollout_logp, mask, rollout_correction,
                                                               is_weights)
    backend = select("ppo_loss_from_hidden", hidden.device)
    if backend == "triton" and hidden.dtype == torch.float64:
        backend = "torch"
    if backend == "triton":
        from rlhf_fast.kernels.logprobs import logprobs_bwd as rows_bwd, logprobs_fwd as rows_fwd
    else:
        rows_fwd, rows_bwd = (native_rows_fwd, native_rows_bwd) if backend == "native" else (torch_rows_fwd,
                                                                                            torch_rows_bwd)
    finite = torch.isfinite(advantages)
    for t in (old_logp, ref_logp, is_weights):
        if t is not None:
            finite &= torch.isfinite(t)
    valid = mask.bool() & finite  # (batch, T)
    nonfinite = (mask.bool() & ~finite).sum()
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = agg.token_weights(valid).to(cd)
    idx = valid.flatten().nonzero().squeeze(1)  # (M,)
    take = lambda t: None if t is None else t.reshape(-1).index_select(0, idx)  # noqa: E731
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)  # (M, H)
    kl_coef, kl_kind = (0.0, "k3") if kl is None else (float(kl.coef), kl.kind)
    thr = None if support_threshold is None else take(support_threshold.detach()).to(cd)  # (M,) replayed
    softcap = float(softcap)
    cut = ChunkSupport.of(weight.shape[0], 1.0 / temperature, top_k, top_p, thr, backend, softcap)
    cfg = (clip, kl_coef, kl_kind, float(entropy_coef), 1.0 / temperature, chunk_size, rows_fwd, rows_bwd, cut,
           softcap, on_policy or clip.level != "token")
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y, adv, w = take(labels).to(torch.int64).contiguous(), take(advantages), take(w)
    old = torch.zeros(idx.shape[0], dtype=cd, device=h.device) if on_policy else take(old_logp)  # on-policy: lr 0
    isw = None if is_weights is None else take(is_weights.detach()).to(cd)
    spread = None
    if on_policy and clip.level == "sequence-sum":  # lr 0 given: the derivative does not read logp's values
        row = idx // max(mask.shape[-1], 1)
        spread = _sequence_sum_grad(torch.zeros_like(old), old, adv, isw, w, row, mask.shape[0], clip)
    elif clip.level != "token" and not on_policy:  # old -> each token's sg[mean (or sum) over its row of logp - old]
        row = idx // max(mask.shape[-1], 1)  # (M,) row of each valid token
        lp = _valid_logp(h.detach(), weight.detach(), None if bias is None else bias.detach(), y, 1.0 / temperature,
                         chunk_size, rows_fwd, cd, cut, softcap)
        seq = torch.zeros(mask.shape[0], dtype=cd, device=h.device).index_add_(0, row, lp - old.to(cd))
        if clip.level == "sequence":
            seq = seq / valid.sum(-1).clamp(min=1).to(cd)
        old = seq[row]  # (M,)
        if clip.level == "sequence-sum":
            spread = _sequence_sum_grad(lp, old, adv, isw, w, row, mask.shape[0], clip)
    loss, *stats, tok_logp, tok_ent = _FusedPPO.apply(h, weight, bias, y, old, adv, take(ref_logp), isw, w, spread,
                                                      cfg)
    # gradients reach `hidden` through the index_select above
    per_tok = (None, None)
    if token_stats:  # (M,) -> (batch, T), 0 off the valid tokens
        per_tok = tuple(torch.zeros(valid.numel(), dtype=cd, device=h.device).index_copy_(0, idx, t).view(valid.shape)
                        for t in (tok_logp, tok_ent))
    return loss, FusedPPOStats(*stats, nonfinite + dropped, corr, *per_tok)
