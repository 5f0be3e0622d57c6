"""The PPO stage's algorithms: each is a choice of advantage estimator and loss options for the one PPO trainer.

| algorithm              | critic | advantages (`rlhf_fast.ops`)                                  | loss defaults                  |
|------------------------|--------|---------------------------------------------------------------|--------------------------------|
| ppo                    | yes    | token_rewards -> gae(gamma, lam), whitened                    | token-mean                     |
| grpo                   | no     | group_advantages(R, prompt, "grpo"), (s - mean_g)/(std_g+eps) | token-mean                     |
| dr_grpo                | no     | group_advantages(..., scale="none"): s - mean_g               | sum / (rows * max_new_tokens)  |
| dapo                   | no     | as grpo; rows of zero-std groups leave the update             | token-mean, clip_high 0.28     |
| rloo                   | no     | group_advantages(..., "rloo"): n/(n-1) (s - mean_g)           | token-mean                     |
| reinforce_pp           | no     | reinforce_pp_advantages: whitened return to go (gae, lam 1)   | token-mean                     |
| reinforce_pp_baseline  | no     | group_advantages(..., "reinforce_pp_baseline")                | token-mean                     |

The groups are the `n_samples` completions of one prompt. For the group estimators a sequence's reward R is its
return from the first token, R = score - beta * sum_t KL_t (the sum of `token_rewards`, as verl feeds its
estimators token_level_rewards.sum(-1)); with `kl.placement="loss"` beta is 0 here and the KL sits in the loss.
A critic-free algorithm loads no value model and trains no value head.
"""
from __future__ import annotations

import dataclasses

import torch

from rlhf_fast import ops
from rlhf_fast.ops.loss_spec import AGG_MODES

CONSTANT_AGG = "seq-mean-token-sum-norm"  # verl's name for Dr. GRPO's constant normaliser
LOSS_AGGS = AGG_MODES + (CONSTANT_AGG,)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    critic: bool  # a value model, GAE and the value loss
    estimator: str  # "gae" | "group" | "reinforce_pp"
    group_mode: str = "grpo"  # ops.group_advantages mode (estimator "group")
    scale: str = "group"  # ops.group_advantages scale (grpo)
    loss_agg: str = "token-mean"  # default `ppo.loss_agg`
    clip_high: float | None = None  # default `ppo.clip_high` (None: symmetric clipping)
    drop_zero_std: bool = False  # DAPO's dynamic sampling: rows whose group has std 0 are not trained on


ALGORITHMS = {a.name: a for a in (
    Algorithm("ppo", critic=True, estimator="gae"),
    Algorithm("grpo", critic=False, estimator="group"),
    Algorithm("dr_grpo", critic=False, estimator="group", scale="none", loss_agg=CONSTANT_AGG),
    Algorithm("dapo", critic=False, estimator="group", clip_high=0.28, drop_zero_std=True),
    Algorithm("rloo", critic=False, estimator="group", group_mode="rloo"),
    Algorithm("reinforce_pp", critic=False, estimator="reinforce_pp"),
    Algorithm("reinforce_pp_baseline", critic=False, estimator="group", group_mode="reinforce_pp_baseline"),
)}


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"ppo.algorithm must be one of {tuple(ALGORITHMS)}, got {name!r}") from None


def loss_agg(mode: str, rows: int, max_new_tokens: int) -> ops.PPOAgg:
    """The policy loss's aggregation for a minibatch of `rows` sequences; the constant normaliser divides the
    token sum by rows * max_new_tokens (Dr. GRPO, Liu et al. 2025), independent of the sampled lengths."""
    if mode == CONSTANT_AGG:
        return ops.PPOAgg("token-mean", num_tokens=rows * max_new_tokens)
    return ops.PPOAgg(mode)


@torch.no_grad()
def critic_free_advantages(algo: Algorithm, scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                           mask: torch.Tensor, prompt_index: list[int], *, kl_coef: float, kl_kind: str,
                           gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N, R), keep (N,) bool) of a critic-free algorithm; keep is False for the rows DAPO drops.

    scores (N,); old_logp, ref_logp, mask (N, R); prompt_index (N,): the group of each sequence."""
    if algo.estimator == "reinforce_pp":
        adv = ops.reinforce_pp_advantages(scores, old_logp, ref_logp, mask, kl_coef=kl_coef, kind=kl_kind,
                                          gamma=gamma)
        return adv, torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    rewards = ops.token_rewards(scores, old_logp, ref_logp, mask, kl_coef=kl_coef, kind=kl_kind)  # (N, R)
    groups = torch.tensor(prompt_index, dtype=torch.int64, device=scores.device)
    res = ops.group_advantages(rewards.sum(-1), groups, algo.group_mode, scale=algo.scale, mask=mask)
    keep = res.nonzero_std() if algo.drop_zero_std else torch.ones_like(groups, dtype=torch.bool)
    return ops.expand_advantages(res.advantages, mask), keep
