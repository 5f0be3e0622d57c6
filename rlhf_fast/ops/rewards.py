"""`token_rewards`: the InstructGPT per-token reward that GAE consumes."""
from __future__ import annotations

import numbers

import torch

from rlhf_fast.ops import _checks
from rlhf_fast.ops.kl import KL_KINDS, kl_penalty


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
                  kl_coef: float, kind: str = "k1") -> torch.Tensor:
    """Per-token reward r_t = -kl_coef * kl_t + [t is the last valid token] * score (Ouyang et al. 2022, eq. 2).

    scores: (batch,) the reward model's scalar per sequence; logp, ref_logp, mask: (batch, T) (left or right
    padding, holes allowed: "last valid" is the largest t with mask 1). kl_t = kl_penalty(logp, ref_logp, kind).
    Returns (batch, T) in the promoted dtype of logp and ref_logp; 0 on masked tokens; an empty row gets no score.
    Differentiable through kl_penalty (rewards are normally computed under no_grad).
    """
    _checks.check_float("scores", scores, ndim=1)
    _checks.check_float("logp", logp, ndim=2)
    _checks.check_float("ref_logp", ref_logp, ndim=2)
    _checks.check_same_shape(("logp", "ref_logp"), (logp, ref_logp))
    _checks.check_mask("mask", mask)
    if mask.shape != logp.shape:
        raise ValueError(f"mask must have the same shape as logp {tuple(logp.shape)}; got {_checks.desc(mask)}")
    if scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must have shape ({logp.shape[0]},) (one per sequence); got {_checks.desc(scores)}")
    _checks.check_same_device(("logp", "ref_logp", "mask", "scores"), (logp, ref_logp, mask, scores))
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, numbers.Real) or not float(kl_coef) >= 0:
        raise ValueError(f"kl_coef must be a real number >= 0, got {kl_coef!r}")
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.promote_types(logp.dtype, ref_logp.dtype), device=logp.device)
    r = torch.where(m, -float(kl_coef) * kl_penalty(logp, ref_logp, kind), zero)
    if m.shape[-1] == 0:  # no tokens: nothing to put the score on
        return r
    pos = torch.arange(m.shape[-1], device=m.device)
    last = torch.where(m, pos, -1).amax(-1, keepdim=True)  # (batch, 1): last valid index, -1 for an empty row
    return r + torch.where((pos == last) & m, scores[:, None].to(r.dtype), zero)
