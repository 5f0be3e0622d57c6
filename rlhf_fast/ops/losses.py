"""PPO clipped policy loss and clipped value loss: Triton forward/backward kernels (and native C++ on CPU for
the value loss; on CPU the policy loss runs its PyTorch composition, whose vectorised exp is the faster path).

Both take padded (batch, T) tensors and a 0/1 mask, reduce with one of four aggregations and return
`(loss, stats)`, the stats computed in the same pass. Gradients flow to `logp` (policy) and `values` (value loss)
only; the other inputs are treated as constants, as every PPO trainer does.

Non-finite inputs: a valid token whose logp / old_logp / advantage (or value / old value / return) is NaN or Inf
is dropped from the loss, the normalisers and the stats, and counted in `stats.nonfinite`. The loss stays finite
and the caller checks the flag (no host synchronisation is forced). Masked tokens may hold anything.

Clipping and aggregation are given as `PPOClip` / `PPOAgg` (rlhf_fast.ops.loss_spec, whose `PPOAgg.token_weights`
defines the four aggregation modes and their global normalisers); the kernels write per-row partial sums and the
loss is sum_b row_weight_b * row_sum_b.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast import backend
from rlhf_fast.kernels.loss_layout import (LOG_RATIO_CLAMP, P_CLIPPED, P_COUNT, P_KL, P_LOSS, P_NONFINITE, P_RATIO,
                                           P_RMAX, P_RMIN, V_CLIPPED, V_COUNT, V_EM2, V_EMEAN, V_LOSS, V_NONFINITE,
                                           V_RM2, V_RMEAN, V_VSUM)
from rlhf_fast.ops import _checks
from rlhf_fast.ops import reference as ref
from rlhf_fast.ops.loss_spec import PPOAgg, PPOClip, RolloutCorrection
from rlhf_fast.ops.rollout_correction import RolloutCorrectionStats, apply_rollout_correction

backend.register_op("ppo_policy_loss", triton=True)
backend.register_op("value_loss", triton=True, native_cpu="ppo_value_partials_cpu")


class PolicyLossStats(NamedTuple):
    """Detached 0-d tensors over the valid, finite tokens of this call (not global)."""

    clip_frac: torch.Tensor  # fraction of tokens whose loss is clipped (zero gradient), dual clip included
    approx_kl: torch.Tensor  # mean(r - 1 - log r), an estimate of KL(pi_old || pi); 0 when nothing is valid
    ratio_mean: torch.Tensor  # ratio stats are 1 when nothing is valid
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    nonfinite: torch.Tensor  # int64 count of valid tokens dropped for a NaN/Inf input (rollout_logp's included)
    rollout_correction: RolloutCorrectionStats | None = None  # given rollout_logp: the rollout-vs-trainer stats


class ValueLossStats(NamedTuple):
    """Detached 0-d tensors over the valid, finite tokens of this call (not global)."""

    clip_frac: torch.Tensor  # fraction of tokens where the clipped branch is larger
    explained_variance: torch.Tensor  # 1 - Var[R - v] / Var[R]; 0 when Var[R] == 0
    value_mean: torch.Tensor
    return_mean: torch.Tensor
    nonfinite: torch.Tensor  # int64 count of valid tokens dropped for a NaN/Inf input


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_inputs(names, tensors, mask) -> None:
    for n, t in zip(names, tensors):
        _checks.check_float(n, t, ndim=2)
    _checks.check_same_shape(names, tensors)
    _checks.check_mask("mask", mask)
    if mask.shape != tensors[0].shape:
        raise ValueError(f"mask must have the same shape as {names[0]} {tuple(tensors[0].shape)}; "
                         f"got {_checks.desc(mask)}")
    _checks.check_same_device((*names, "mask"), (*tensors, mask))


def _reduce_rows(row_loss: torch.Tensor, row_cnt: torch.Tensor, agg: PPOAgg, length: int):
    """(loss, row_weight): the aggregated loss from per-row sums (batch,) and d loss / d l_{b,t} per row."""
    w = agg.row_weights(row_cnt, length).to(row_loss.dtype)
    return (row_loss * w).sum(), w


def _kernels(use: str):
    """The launcher module of a backend: same functions and partial-sum layout for Triton and native."""
    if use == "triton":
        from rlhf_fast.kernels import ppo_losses as kp
    else:
        from rlhf_fast.ops import _losses_native as kp
    return kp


def _combine_variance(part: torch.Tensor, count: int, mean: int, m2: int) -> torch.Tensor:
    """Unbiased variance (0-d, float64) from per-chunk (count, mean, M2) partials (Chan et al. 1979); 0 if n < 2."""
    n_i, mean_i, m2_i = (part[..., k].double().reshape(-1) for k in (count, mean, m2))
    n = n_i.sum()
    mu = (n_i * mean_i).sum() / n.clamp(min=1)
    m2 = m2_i.sum() + (n_i * (mean_i - mu) ** 2).sum()
    return m2 / (n - 1).clamp(min=1)


class _PolicyLossTorch(torch.autograd.Function):
    """The PyTorch path (CPU, or no kernel): the forward also forms d l / d logp, so the backward is one multiply
    instead of autograd replaying a dozen elementwise ops (the reference in `ops.reference` stays the oracle)."""

    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, isw, clip, agg, lr_given, spread):
        lower, upper, dual = clip.lower, clip.upper, clip.dual
        dt = _compute_dtype(logp)
        lp, old, a = logp.to(dt), old_logp.to(dt), adv.to(dt)
        m = mask.bool()
        valid = m & torch.isfinite(lp) & torch.isfinite(old) & torch.isfinite(a)
        if isw is not None:
            isw = isw.to(dt)
            valid &= torch.isfinite(isw)
        zero = torch.zeros((), dtype=dt, device=lp.device)
        raw = torch.where(valid, old if lr_given else lp - old, zero)  # (batch, T); 0 on invalid tokens: ratio 1
        a = torch.where(valid, a, zero)  # ... and their loss and gradient 0
        lr = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(lr)
        pg1, pg2 = -a * ratio, -a * ratio.clamp(lower, upper)
        tok, clipped = torch.maximum(pg1, pg2), pg2 > pg1
        if dual is not None:
            pg3 = -a * dual
            dual_on = (a < 0) & (pg3 < tok)
            tok, clipped = torch.where(dual_on, pg3, tok), clipped | dual_on
        dtok = torch.where(~clipped & (raw.abs() <= LOG_RATIO_CLAMP), pg1, zero)  # d l / d logp
        if isw is not None:
            isw = torch.where(valid, isw, zero)
            tok, dtok = tok * isw, dtok * isw
        row_cnt = valid.sum(-1)
        loss, w = _reduce_rows(tok.sum(-1), row_cnt, agg, lp.shape[-1])
        n = row_cnt.sum().clamp(min=1).to(dt)
        some = valid.any()
        one = torch.ones((), dtype=dt, device=lp.device)
        r_min = torch.where(valid, ratio, torch.inf).min() if ratio.numel() else one
        r_max = torch.where(valid, ratio, -torch.inf).max() if ratio.numel() else one
        stats = ((clipped & valid).sum().to(dt) / n, (torch.expm1(lr) - lr).sum() / n,
                 torch.where(some, torch.where(valid, ratio, zero).sum() / n, one),
                 torch.where(some, r_min, one), torch.where(some, r_max, one), (m & ~valid).sum())
        ctx.save_for_backward(dtok, w, valid if spread else None)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, g_loss, *_):
        dtok, w, valid = ctx.saved_tensors
        grad = dtok * (w * g_loss)[:, None]
        if valid is not None:
            grad = _spread(grad, valid)
        return grad.to(ctx.logp_dtype), None, None, None, None, None, None, None, None


def _spread(grad: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The sequence-sum level's exact gradient: every valid token of a row gets the row's summed (stop-gradient)
    derivative, since d exp(sum_t lr_t) / d logp_t is the same for all t."""
    return torch.where(valid, grad.sum(-1, keepdim=True), torch.zeros((), dtype=grad.dtype, device=grad.device))


class _PolicyLossKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, isw, clip, agg, lr_given, spread, kp):
        p = kp.policy_partials(logp, old_logp, adv, mask, clip, is_weights=isw, lr_given=lr_given)  # (batch, C, K)
        rows = p.sum(1)  # per-row sums
        cnt = rows[:, P_COUNT]
        loss, w = _reduce_rows(rows[:, P_LOSS], cnt, agg, logp.shape[-1])
        n = cnt.sum()
        some = n > 0
        one = torch.ones((), dtype=p.dtype, device=p.device)
        stats = (rows[:, P_CLIPPED].sum() / n.clamp(min=1), rows[:, P_KL].sum() / n.clamp(min=1),
                 torch.where(some, rows[:, P_RATIO].sum() / n.clamp(min=1), one),
                 torch.where(some, p[:, :, P_RMIN].min(), one), torch.where(some, p[:, :, P_RMAX].max(), one),
                 rows[:, P_NONFINITE].sum().round().to(torch.int64))
        ctx.save_for_backward(logp, old_logp, adv, mask, isw, w)
        ctx.clip, ctx.lr_given, ctx.spread, ctx.kp = clip, lr_given, spread, kp
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, g_loss, *_):
        logp, old_logp, adv, mask, isw, w = ctx.saved_tensors
        # the sequence-sum level sums per-token derivatives: keep them in the compute dtype until then
        grad = torch.empty(logp.shape, dtype=_compute_dtype(logp), device=logp.device) if ctx.spread else \
            torch.empty_like(logp)
        ctx.kp.policy_backward(logp, old_logp, adv, mask, (w * g_loss).contiguous(), grad, ctx.clip, is_weights=isw,
                               lr_given=ctx.lr_given)
        if ctx.spread:
            grad = _spread(grad, _valid(mask, logp, old_logp, adv, isw)).to(logp.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous() if mask.dtype != torch.bool else mask.contiguous().view(torch.uint8)


def token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch,) per-sequence advantages (GRPO, RLOO) broadcast to like's (batch, T); anything else unchanged."""
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 1 and like.dim() == 2 and \
            advantages.shape[0] == like.shape[0]:
        return advantages[:, None].expand(like.shape)
    return advantages


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, valid: torch.Tensor,
                       level: str = "sequence") -> torch.Tensor:
    """(batch, T) sequence log ratio: each row's mean (GSPO) or sum (`sequence-sum`) over its valid tokens of
    logp - old_logp, on every valid token (NaN elsewhere, so such tokens stay dropped). Computed in float32 (float64
    for float64 logp), no gradient."""
    dt = _compute_dtype(logp)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    lr = torch.where(valid, logp.detach().to(dt) - old_logp.detach().to(dt), zero)
    seq = lr.sum(-1, keepdim=True)  # (batch, 1)
    if level == "sequence":
        seq = seq / valid.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(valid, seq, torch.full((), float("nan"), dtype=dt, device=logp.device))


def _valid(mask: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
    v = mask.bool()
    for t in tensors:
        if t is not None:
            v = v & torch.isfinite(t)
    return v


def policy_loss_tokens(logp, old_logp, adv, mask, is_weights, clip: PPOClip, agg: PPOAgg, lr_given: bool = False):
    """`ppo_policy_loss` on checked (batch, T) inputs, with `old_logp` the log ratio itself where `lr_given`
    (the fused step passes its tokens' sequence log ratio so, and spreads the sequence-sum gradient itself).
    Returns (loss, PolicyLossStats) in the compute dtype."""
    spread = False
    if clip.level != "token" and not lr_given:
        old_logp = sequence_log_ratio(logp, old_logp, _valid(mask, logp, old_logp, adv, is_weights), clip.level)
        lr_given, spread = True, clip.level == "sequence-sum"
    use = backend.select("ppo_policy_loss", logp.device)
    isw = None if is_weights is None else is_weights.detach()
    if use != "torch" and logp.numel():
        isw = None if isw is None else isw.contiguous()
        loss, *stats = _PolicyLossKernel.apply(logp.contiguous(), old_logp.detach().contiguous(),
                                               adv.detach().contiguous(), _kernel_mask(mask), isw, clip, agg,
                                               lr_given, spread, _kernels(use))
    else:
        loss, *stats = _PolicyLossTorch.apply(logp, old_logp.detach(), adv.detach(), mask, isw, clip, agg, lr_given,
                                              spread)
    return loss, PolicyLossStats(*stats)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip: PPOClip = PPOClip(), agg: PPOAgg | str = "token-mean",
                    is_weights: torch.Tensor | None = None, rollout_logp: torch.Tensor | None = None,
                    rollout_correction: RolloutCorrection | None = None) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7) with optional dual clip (Ye et al. 2020), the
    importance ratio per token or per sequence (GSPO), and per-token importance weights.

    logp, old_logp, mask: (batch, T); mask 0/1 (bool, int or float). advantages: (batch, T), or (batch,) for one
    advantage per sequence (GRPO, RLOO), broadcast over the row's tokens. is_weights: (batch, T) or None, per-token
    importance weights that multiply each token's loss, without gradient (rollout/train mismatch correction: verl
    `rollout_is_weights`, TRL `importance_sampling_ratio`); a NaN/Inf weight drops the token like any input.
    rollout_logp: (batch, T) the rollout engine's log-probs of the sampled tokens, or None; with it,
    `ops.rollout_correction(old_logp, rollout_logp, mask, rollout_correction)` (default `RolloutCorrection()`,
    mode "none": statistics only) gives importance weights, multiplied into is_weights, and a keep mask that replaces
    mask (see `RolloutCorrection` for the modes: tis, mis, icepop, geo_mask); its stats come back in
    `stats.rollout_correction`. old_logp is then the trainer's log-prob of the behaviour policy.
    With r the ratio of `clip.level` (see `PPOClip`; token: r = exp(clamp(logp - old_logp, -20, 20))):
        l = w_is * max(-A r, -A clip(r, 1 - clip.low, 1 + clip.high)), and for A < 0 with `clip.dual` = c > 1
        l = w_is * min(max(...), -c A);
    `clip.high` defaults to `clip.low` (asymmetric "clip-higher" as in DAPO when larger). The per-token losses are
    reduced by `agg` (a `PPOAgg` with its global normalisers, or a mode string; see rlhf_fast.ops.loss_spec).
    verl `compute_policy_loss_vanilla` / `compute_policy_loss_gspo` and TRL GRPOTrainer `_compute_loss` (loss_type
    grpo / bnpo / dr_grpo / dapo, epsilon_low / epsilon_high, importance_sampling_level) are choices of these
    arguments. Returns (loss: 0-d float32, or float64 for float64 logp; stats: PolicyLossStats, whose ratio stats
    are those of the sequence ratio on the sequence levels, unweighted by is_weights).
    """
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 1 and isinstance(logp, torch.Tensor) and \
            logp.dim() == 2 and advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages must have logp's shape {tuple(logp.shape)} or ({logp.shape[0]},) (one per "
                         f"sequence); got {_checks.desc(advantages)}")
    advantages = token_advantages(advantages, logp)
    names, tensors = ("logp", "old_logp", "advantages"), (logp, old_logp, advantages)
    if is_weights is not None:
        names, tensors = (*names, "is_weights"), (*tensors, is_weights)
    _check_inputs(names, tensors, mask)
    if not isinstance(clip, PPOClip):
        raise TypeError(f"clip must be a PPOClip, got {type(clip).__name__}")
    agg = PPOAgg.of(agg)
    mask, is_weights, corr, dropped = apply_rollout_correction(old_logp, rollout_logp, mask, rollout_correction,
                                                               is_weights)
    loss, stats = policy_loss_tokens(logp, old_logp, advantages, mask, is_weights, clip, agg)
    dt = _compute_dtype(logp)
    stats = PolicyLossStats(*(t.to(dt) if t is not None and t.is_floating_point() else t for t in stats))
    if corr is not None:
        stats = stats._replace(nonfinite=stats.nonfinite + dropped, rollout_correction=corr)
    return loss.to(dt), stats


class _ValueLossKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, agg, kp):
        p = kp.value_partials(values, old_values, returns, mask, clip)  # (batch, chunks, K)
        rows = p.sum(1)
        cnt = rows[:, V_COUNT]
        loss, w = _reduce_rows(rows[:, V_LOSS], cnt, agg, values.shape[-1])
        n = cnt.sum()
        var_r = _combine_variance(p, V_COUNT, V_RMEAN, V_RM2)
        var_e = _combine_variance(p, V_COUNT, V_EMEAN, V_EM2)
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        ev = torch.where(var_r > 0, 1 - var_e / torch.where(var_r > 0, var_r, 1), zero).to(p.dtype)
        stats = (rows[:, V_CLIPPED].sum() / n.clamp(min=1), ev,
                 rows[:, V_VSUM].sum() / n.clamp(min=1), (p[:, :, V_RMEAN] * p[:, :, V_COUNT]).sum()
                 / n.clamp(min=1), rows[:, V_NONFINITE].sum().round().to(torch.int64))
        ctx.save_for_backward(values, old_values, returns, mask, w)
        ctx.clip, ctx.kp = clip, kp
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, g_loss, *_):
        values, old_values, returns, mask, w = ctx.saved_tensors
        grad = torch.empty_like(values)
        ctx.kp.value_backward(values, old_values, returns, mask, (w * g_loss).contiguous(), grad, ctx.clip)
        return grad, None, None, None, None, None, None


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float | None = 0.2, agg: PPOAgg | str = "token-mean") -> tuple[torch.Tensor, ValueLossStats]:
    """Clipped value loss (PPO2): l = 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).

    values, old_values, returns, mask: (batch, T); `clip=None` gives the plain 0.5 (v - R)^2. agg as in
    `ppo_policy_loss`. Returns (loss: 0-d float32, or float64 for float64 values; ValueLossStats).
    """
    _check_inputs(("values", "old_values", "returns"), (values, old_values, returns), mask)
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip!r}")
    agg = PPOAgg.of(agg)
    use = backend.select("value_loss", values.device)
    dt = _compute_dtype(values)
    if use != "torch" and values.numel():
        loss, *stats = _ValueLossKernel.apply(values.contiguous(), old_values.detach().contiguous(),
                                              returns.detach().contiguous(), _kernel_mask(mask),
                                              None if clip is None else float(clip), agg, _kernels(use))
        return loss.to(dt), ValueLossStats(*(t.to(dt) if t.is_floating_point() else t for t in stats))
    loss, st = ref.value_loss(values.to(dt), old_values.detach().to(dt), returns.detach().to(dt), mask, clip=clip,
                              agg=agg)
    return loss, ValueLossStats(**st)
