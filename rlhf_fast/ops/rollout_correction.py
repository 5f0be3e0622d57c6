"""Rollout correction: importance weights and a keep mask for rollout log-probs that differ from the trainer's, and
the mismatch statistics to log per iteration (the modes and their peer equivalents: `RolloutCorrection` in
rlhf_fast.ops.loss_spec).

Pure PyTorch, elementwise and row sums only: no kernel of its own. The policy losses call `apply_rollout_correction`
when given `rollout_logp=`; the weights then ride on their `is_weights` path and the keep mask replaces the mask.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast.kernels.loss_layout import LOG_RATIO_CLAMP
from rlhf_fast.ops import _checks
from rlhf_fast.ops.loss_spec import RolloutCorrection


class RolloutCorrectionStats(NamedTuple):
    """Detached 0-d tensors over the valid tokens whose two log-probs are finite (this call's, not global)."""

    k3_kl: torch.Tensor  # mean of expm1(lr) - lr, lr = trainer - rollout: KL(pi_rollout || pi_train) (verl k3_kl)
    max_abs_dlogp: torch.Tensor  # max |trainer_logp - rollout_logp| (unclamped); 0 when nothing is valid
    outside_10pct: torch.Tensor  # fraction of tokens whose ratio w is outside [0.9, 1.1]
    outside_1pct: torch.Tensor  # ... outside [0.99, 1.01]
    masked_frac: torch.Tensor  # fraction of tokens the correction takes out of the gradient (dropped or weight 0)
    masked_seq_frac: torch.Tensor  # fraction of rows with a valid token that lost at least one token so
    weight_mean: torch.Tensor  # mean importance weight over the kept tokens (1 without weights)
    nonfinite: torch.Tensor  # int64: valid tokens with a NaN/Inf trainer or rollout log-prob (dropped unless "none")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rollout_correction(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       correction: RolloutCorrection = RolloutCorrection()):
    """Importance weights and keep mask of `correction` for tokens sampled by a rollout engine.

    trainer_logp: (batch, T) the trainer's log-probs of the behaviour policy (old_logp); rollout_logp: (batch, T)
    the engine's; mask: (batch, T) 0/1. With lr = trainer_logp - rollout_logp on the valid tokens, w = exp(lr) per
    token, W = exp(sum_t lr) and G = exp(mean_t lr) per row (log ratios clamped to [-20, 20] before exp; see
    `RolloutCorrection` for the modes).

    A valid token with a NaN/Inf log-prob on either side is left out of every sum and statistic (torch.where, so
    nothing leaks) and counted in `stats.nonfinite`; every mode but "none" also drops it from keep_mask, as
    `ppo_policy_loss` drops a non-finite token (mode "none" leaves the mask to the loss). Masked-out positions may
    hold anything.

    Returns (is_weights: (batch, T) float32 (float64 for float64 trainer_logp) without gradient, 0 outside keep_mask,
    or None for modes without weights; keep_mask: (batch, T) bool, the tokens left in the loss;
    stats: RolloutCorrectionStats).
    """
    names = ("trainer_logp", "rollout_logp")
    for n, t in zip(names, (trainer_logp, rollout_logp)):
        _checks.check_float(n, t, ndim=2)
    _checks.check_same_shape(names, (trainer_logp, rollout_logp))
    _checks.check_mask("mask", mask)
    if mask.shape != trainer_logp.shape:
        raise ValueError(f"mask must have trainer_logp's shape {tuple(trainer_logp.shape)}; got {_checks.desc(mask)}")
    _checks.check_same_device((*names, "mask"), (trainer_logp, rollout_logp, mask))
    if not isinstance(correction, RolloutCorrection):
        raise TypeError(f"correction must be a RolloutCorrection, got {type(correction).__name__}")

    dt = _compute_dtype(trainer_logp)
    tl, rl = trainer_logp.detach().to(dt), rollout_logp.detach().to(dt)
    m = mask.bool()
    finite = torch.isfinite(tl) & torch.isfinite(rl)
    valid = m & finite  # (batch, T)
    zero = torch.zeros((), dtype=dt, device=tl.device)
    one = torch.ones((), dtype=dt, device=tl.device)
    lr = torch.where(valid, tl - rl, zero)  # (batch, T), 0 off the valid tokens
    lrc = lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w_tok = torch.exp(lrc)

    mode = correction.mode
    if correction.level == "token":
        r = w_tok
    else:  # one ratio per row, on each of its valid tokens
        seq = lr.sum(-1, keepdim=True)  # (batch, 1)
        if mode == "geo_mask":
            seq = seq / valid.sum(-1, keepdim=True).clamp(min=1).to(dt)
        r = torch.exp(seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(lr)
    lo, hi = correction.bounds
    weights, keep, out = None, (m if mode == "none" else valid), torch.zeros_like(valid)
    if mode == "tis":
        weights = torch.where(valid, r.clamp(min=lo, max=hi), zero)
    elif mode != "none":
        out = valid & ((r < lo) | (r > hi))  # (batch, T) tokens outside the kept range
        if mode == "icepop":
            weights = torch.where(valid & ~out, r, zero)
        else:  # mis, geo_mask: rejection
            keep = valid & ~out

    n = valid.sum()
    nf = n.clamp(min=1).to(dt)
    rows = valid.any(-1)  # (batch,) rows with a valid token
    frac = lambda b: (b & valid).sum().to(dt) / nf  # noqa: E731
    kept = keep & valid
    weight_mean = one if weights is None else \
        torch.where(kept.any(), torch.where(kept, weights, zero).sum() / kept.sum().clamp(min=1).to(dt), one)
    stats = RolloutCorrectionStats(
        k3_kl=torch.where(valid, torch.expm1(lrc) - lrc, zero).sum() / nf,
        max_abs_dlogp=lr.abs().max() if lr.numel() else zero,
        outside_10pct=frac((w_tok < 0.9) | (w_tok > 1.1)),
        outside_1pct=frac((w_tok < 0.99) | (w_tok > 1.01)),
        masked_frac=frac(out),
        masked_seq_frac=out.any(-1).sum().to(dt) / rows.sum().clamp(min=1).to(dt),
        weight_mean=weight_mean,
        nonfinite=(m & ~finite).sum(),
    )
    return weights, keep, stats


def apply_rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, mask: torch.Tensor,
                             correction: RolloutCorrection | None, is_weights: torch.Tensor | None):
    """What a policy loss given `rollout_logp=` / `rollout_correction=` runs on: (mask, is_weights, stats, dropped)
    with the correction's keep mask, its weights multiplied into the given `is_weights`, its stats and the int64
    count of tokens it dropped for a non-finite log-prob (to add to the loss's own `nonfinite`). Both None: the
    inputs unchanged, stats None."""
    if rollout_logp is None:
        if correction is not None:
            raise ValueError("rollout_correction needs rollout_logp (the rollout engine's log-probs, (batch, T))")
        return mask, is_weights, None, 0
    correction = RolloutCorrection() if correction is None else correction
    weights, keep, stats = rollout_correction(old_logp, rollout_logp, mask, correction)
    if weights is not None:
        is_weights = weights if is_weights is None else is_weights.detach() * weights
    if correction.mode == "none":
        return mask, is_weights, stats, 0
    return keep, is_weights, stats, stats.nonfinite
