"""Critic-free advantage estimators: `group_advantages` (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) and the two
that are compositions of `token_rewards` and `gae` (REINFORCE++, ReMax).

`group_advantages` is one segmented pass over arbitrary integer group ids (rows of a group need not be adjacent:
verl reorders its batch). With n_g, mean_g and std_g the count, mean and Bessel-corrected standard deviation of the
scores of row i's group g (std_g = 0 when n_g = 1), x_i = s_i - mean_g:

  mode="grpo" (Shao et al. 2024, eq. 3; verl `compute_grpo_outcome_advantage`, TRL `GRPOTrainer` `scale_rewards`)
      scale="group":  A_i = x_i / (std_g + eps)
      scale="batch":  A_i = x_i / (std_B + eps),  std_B the Bessel std of all B scores (TRL "batch")
      scale="none":   A_i = x_i                   (Dr. GRPO, Liu et al. 2025; verl norm_adv_by_std_in_grpo=False)
  mode="rloo"   A_i = n_g / (n_g - 1) * x_i = s_i - mean of the other n_g - 1 scores (Ahmadian et al. 2024; verl
                `compute_rloo_outcome_advantage`, OpenRLHF `advantage_estimator="rloo"`)
  mode="reinforce_pp_baseline"  A_i = whiten(x)_i = (x_i - mu) / sqrt(var + 1e-8), mu and the Bessel var over the
                batch (Hu 2025; verl `compute_reinforce_plus_plus_baseline_outcome_advantage`, whose whitening runs
                over tokens: pass `mask` and each row weighs its number of valid tokens, as there)

A group of one has no baseline: x_i = 0, so its advantage is 0 (TRL's convention). `keep_singletons=True` uses
verl's instead: baseline 0 and std 1 for a group of one (A = s / (1 + eps) in grpo/group, s in rloo and Dr. GRPO).
`eps` defaults to verl's 1e-6 (TRL adds 1e-4).

REINFORCE++ (verl `compute_reinforce_plus_plus_outcome_advantage`) and ReMax (Li et al. 2023; verl
`compute_remax_outcome_advantage`) need no group statistic: they are `token_rewards` then `gae` with values 0 and
lam = 1 (the discounted return to go), then whitening (REINFORCE++) or a baseline score subtracted (ReMax):
`reinforce_pp_advantages` and `remax_advantages` below.

Backends: Triton (launch 1: one program per group computes its moments; launch 2: rows in blocks combine the group
partials into the batch statistics and write the advantages), native CPU C++ (three sequential O(B) sweeps in
double, csrc/group_advantages.cpp over csrc/group_advantages_impl.h), the torch path below (scatter-add in the
accumulation dtype) and the float64 oracle `reference.group_advantages` (one Python loop over groups).
No gradient: advantages are data.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from rlhf_fast import _native, backend
from rlhf_fast._native import arg
from rlhf_fast.ops import _checks
from rlhf_fast.ops import reference as ref
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.rewards import token_rewards
from rlhf_fast.ops.stats import WHITEN_EPS, masked_whiten

MODES = ("grpo", "rloo", "reinforce_pp_baseline")
SCALES = ("group", "batch", "none")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

backend.register_op("group_advantages", triton=True, native_cpu="group_advantages_cpu")


class GroupAdvantages(NamedTuple):
    """Result of `group_advantages`. G = number of distinct group ids."""

    advantages: torch.Tensor  # (B,) in the scores' dtype
    group_mean: torch.Tensor  # (G,) mean score of each group (float32; float64 for float64 scores)
    group_std: torch.Tensor  # (G,) Bessel-corrected std of each group's scores, 0 for a group of one
    group_count: torch.Tensor  # (G,) int64 rows per group
    group_index: torch.Tensor  # (B,) int64: row i belongs to group group_index[i] of the (G,) statistics
    groups: torch.Tensor  # (G,) int64: the group ids, ascending (for a list input: first-appearance order)

    def nonzero_std(self) -> torch.Tensor:
        """(B,) bool: rows whose group has std > 0 (DAPO's dynamic sampling keeps only these)."""
        return self.group_std[self.group_index] > 0


@torch.library.custom_op("rlhf_fast::group_advantages_cpu", mutates_args=("adv", "mean", "std", "count"))
def _native_call(scores: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, num_groups: int,
                 mode: int, scale: int, keep_singletons: bool, eps: float, adv: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, count: torch.Tensor) -> None:
    """scores, adv (B,) one float dtype; index (B,) int64 in [0, G); weights (B,) float64 or None; mean, std (G,)
    float64, count (G,) int64, all contiguous CPU tensors."""
    f64 = torch.float64
    _native.call("group_advantages_cpu", arg("scores", scores, code=True), arg("index", index, torch.int64),
                 0 if weights is None else arg("weights", weights, f64), scores.numel(), num_groups, mode, scale,
                 keep_singletons, float(eps), arg("adv", adv, scores.dtype), arg("mean", mean, f64),
                 arg("std", std, f64), arg("count", count, torch.int64))


@_native_call.register_fake
def _(scores, index, weights, num_groups, mode, scale, keep_singletons, eps, adv, mean, std, count) -> None:
    return None


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dense_ids(group_ids, b: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(groups (G,), index (B,), counts (G,)) for a tensor of integer ids (sorted) or a sequence of hashables
    (first-appearance order; e.g. verl's uid strings)."""
    if isinstance(group_ids, torch.Tensor):
        _checks.check_tensor("group_ids", group_ids, dtypes=_INT_DTYPES, ndim=1)
        if group_ids.numel() != b:
            raise ValueError(f"group_ids must have shape ({b},) (one id per score); got {_checks.desc(group_ids)}")
        if group_ids.device != torch.device(device):
            raise ValueError(f"group_ids is on {group_ids.device} but scores is on {device}")
        groups, index, counts = torch.unique(group_ids.long(), sorted=True, return_inverse=True, return_counts=True)
        return groups, index, counts
    try:
        ids = list(group_ids)
    except TypeError:
        raise TypeError(f"group_ids must be an integer tensor or a sequence of ids, got "
                        f"{type(group_ids).__name__}") from None
    if len(ids) != b:
        raise ValueError(f"group_ids must have {b} entries (one id per score); got {len(ids)}")
    first: dict = {}
    try:
        index = [first.setdefault(k, len(first)) for k in ids]
    except TypeError as e:
        raise TypeError(f"group_ids entries must be hashable: {e}") from None
    index_t = torch.tensor(index, dtype=torch.int64, device=device)
    groups = torch.arange(len(first), dtype=torch.int64, device=device)
    return groups, index_t, torch.bincount(index_t, minlength=len(first))


def _torch_path(s, index, counts, weights, mode, scale, keep, eps):
    """The vectorised PyTorch backend: scatter-add moments in the accumulation dtype."""
    acc = _acc(s)
    x = s.to(acc)
    g = counts.numel()
    n = counts.to(acc)
    mean = torch.zeros(g, dtype=acc, device=s.device).index_add_(0, index, x) / n
    dev = x - mean[index]
    m2 = torch.zeros(g, dtype=acc, device=s.device).index_add_(0, index, dev * dev)
    std = torch.where(n > 1, (m2 / (n - 1).clamp(min=1)).sqrt(), torch.zeros((), dtype=acc, device=s.device))
    single = (n < 2)[index]
    c = torch.where(single, x if keep else torch.zeros_like(x), dev)  # s - baseline
    if mode == "grpo":
        if scale == "group":
            denom = torch.where(single, torch.ones_like(x) if keep else torch.zeros_like(x), std[index]) + eps
        elif scale == "batch":
            denom = (x.std() if x.numel() > 1 else torch.zeros((), dtype=acc, device=s.device)) + eps
        else:
            denom = torch.ones((), dtype=acc, device=s.device)
        adv = c / denom
    elif mode == "rloo":
        adv = torch.where(single, c, c * (n / (n - 1).clamp(min=1))[index])
    else:
        w = torch.ones_like(x) if weights is None else weights.to(acc)
        adv = ref.weighted_whiten(c, w, eps=WHITEN_EPS)
    return adv.to(s.dtype), mean, std


def _check_options(mode, scale, eps, keep_singletons):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale != "group" and mode != "grpo":
        raise ValueError(f"scale={scale!r} applies to mode='grpo' only (mode is {mode!r})")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) >= 0:
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
    if not isinstance(keep_singletons, bool):
        raise TypeError(f"keep_singletons must be a bool, got {keep_singletons!r}")


def group_advantages(scores: torch.Tensor, group_ids, mode: str = "grpo", *, scale: str = "group",
                     eps: float = 1e-6, mask: torch.Tensor | None = None,
                     keep_singletons: bool = False) -> GroupAdvantages:
    """Per-sequence advantages from group statistics of the scores (formulas in the module docstring).

    Args:
        scores: (B,) float32/bfloat16/float16/float64, one scalar reward per sequence.
        group_ids: (B,) integer tensor (any values, any order: rows of a group need not be adjacent), or a
            sequence of B hashable ids (e.g. verl's uid strings).
        mode: "grpo" | "rloo" | "reinforce_pp_baseline".
        scale: for grpo only: "group" (GRPO), "batch" (TRL scale_rewards="batch") or "none" (Dr. GRPO).
        eps: added to the std in grpo (verl 1e-6, TRL 1e-4).
        mask: (B, T) 0/1 response mask, or None. Used by reinforce_pp_baseline only: each row then weighs its
            number of valid tokens in the whitening (verl whitens over tokens); None weighs rows equally.
        keep_singletons: a group of one keeps its score (verl) instead of getting advantage 0 (TRL).
    Returns:
        GroupAdvantages(advantages (B,), group_mean (G,), group_std (G,), group_count (G,), group_index (B,),
        groups (G,)). `expand_advantages(result.advantages, mask)` gives the (B, T) per-token advantages.
    """
    _checks.check_float("scores", scores, ndim=1)
    _check_options(mode, scale, eps, keep_singletons)
    b = scores.shape[0]
    weights = None
    if mask is not None:
        _checks.check_mask("mask", mask)
        if mask.dim() != 2 or mask.shape[0] != b:
            raise ValueError(f"mask must be (B={b}, T) (a response mask per score); got {_checks.desc(mask)}")
        _checks.check_same_device(("scores", "mask"), (scores, mask))
        if mode == "reinforce_pp_baseline":
            weights = mask.ne(0).sum(-1).to(torch.float64)
    groups, index, counts = _dense_ids(group_ids, b, scores.device)
    acc = _acc(scores)
    with torch.no_grad():
        s = scores.detach().contiguous()
        use = backend.select("group_advantages", s.device)
        if b == 0:
            adv, mean, std = torch.empty_like(s), torch.empty(0, dtype=acc, device=s.device), \
                torch.empty(0, dtype=acc, device=s.device)
        elif use == "native":
            adv = torch.full_like(s, float("nan"))
            mean64 = torch.empty(counts.numel(), dtype=torch.float64)
            std64 = torch.empty_like(mean64)
            count = torch.empty(counts.numel(), dtype=torch.int64)
            _native_call(s, index.contiguous(), weights, counts.numel(), MODES.index(mode), SCALES.index(scale),
                         keep_singletons, float(eps), adv, mean64, std64, count)
            mean, std = mean64.to(acc), std64.to(acc)
        elif use == "triton":
            from rlhf_fast.kernels import group_advantages as kga

            adv, mean, std = kga.group_advantages(s, index, counts, weights, mode=MODES.index(mode),
                                                  scale=SCALES.index(scale), keep_singletons=keep_singletons,
                                                  eps=float(eps), whiten_eps=WHITEN_EPS)
        else:
            adv, mean, std = _torch_path(s, index, counts, weights, mode, scale, keep_singletons, float(eps))
    return GroupAdvantages(adv, mean, std, counts, index, groups)


def expand_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) advantages -> (B, T) per-token advantages: advantages[:, None] on valid tokens, 0 on masked ones.

    advantages: (B,) float; mask: (B, T) 0/1. Returns (B, T) in the advantages' dtype.
    """
    _checks.check_float("advantages", advantages, ndim=1)
    _checks.check_mask("mask", mask)
    if mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"mask must be (B={advantages.shape[0]}, T); got {_checks.desc(mask)}")
    _checks.check_same_device(("advantages", "mask"), (advantages, mask))
    return torch.where(mask.bool(), advantages[:, None], torch.zeros((), dtype=advantages.dtype,
                                                                   device=advantages.device))


def reinforce_pp_advantages(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                            *, kl_coef: float, kind: str = "k1", gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): whitened discounted return to go of the KL-penalised per-token reward.

        r = token_rewards(scores, logp, ref_logp, mask, kl_coef, kind)       (score on the last valid token)
        G_t = sum_{k >= t, valid} gamma^(k - t) r_k = gae(r, values=0, mask, gamma, lam=1) advantages
        A = masked_whiten(G, mask)

    verl `compute_reinforce_plus_plus_outcome_advantage` computes the same for masks without holes (it restarts
    the return at a masked position, where GAE carries it across). Shapes: scores (B,), the rest (B, T).
    Returns (B, T) advantages, 0 on masked tokens.
    """
    rewards = token_rewards(scores, logp, ref_logp, mask, kl_coef=kl_coef, kind=kind)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return masked_whiten(returns, mask)


def remax_advantages(scores: torch.Tensor, baseline_scores: torch.Tensor, logp: torch.Tensor,
                     ref_logp: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, kind: str = "k1") -> torch.Tensor:
    """ReMax (Li et al. 2023): return to go minus the greedy response's score b,

        A_t = sum_{k >= t, valid} r_k - b = gae(token_rewards(scores - b, ...), values=0, gamma=1, lam=1)

    (subtracting b from the score on the last valid token subtracts it from every return to go), as verl
    `compute_remax_outcome_advantage`. scores, baseline_scores (B,); logp, ref_logp, mask (B, T).
    Returns (B, T), 0 on masked tokens.
    """
    _checks.check_float("baseline_scores", baseline_scores, ndim=1)
    if baseline_scores.shape != scores.shape:
        raise ValueError(f"baseline_scores must have the shape of scores {tuple(scores.shape)}; got "
                         f"{_checks.desc(baseline_scores)}")
    rewards = token_rewards(scores - baseline_scores, logp, ref_logp, mask, kl_coef=kl_coef, kind=kind)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    return adv
