"""verl plug-in: our policy loss, advantage estimators and fused lm_head log-probs inside verl, without a fork.

Selected by verl's own config keys once `register()` has run:

    actor_rollout_ref.actor.policy_loss.loss_mode=rlhf_fast        # verl "vanilla": token ratio, dual clip
    actor_rollout_ref.actor.policy_loss.loss_mode=rlhf_fast_gspo   # verl "gspo": sequence ratio (GSPO)
    algorithm.adv_estimator=rlhf_fast_grpo | rlhf_fast_rloo | rlhf_fast_reinforce_pp_baseline

`register()` runs by itself in every verl process (driver and Ray workers) through the `verl.plugins` entry point
`rlhf_fast` (module `rlhf_fast.integrations.verl_plugin`, loaded by `import verl` from verl 0.9), or for older verl
with `VERL_USE_EXTERNAL_MODULES=rlhf_fast.integrations.verl_plugin`. With `RLHF_FAST_VERL_FUSED_LINEAR=1` the
entry point also calls `patch_fused_linear()`: verl's hidden-state log-prob path (`use_fused_kernels=True`, torch
backend, `verl.utils.experimental.torch_functional.FusedLinearForPPO`) then runs `ops.linear_token_logprobs`.

Supported verl releases: `SUPPORTED_VERSIONS` (exactly those the tests run against); on any other, `register()`
raises `rlhf_fast.integrations._versions.UnsupportedPeerVersion` naming both (`load_plugin` then marks our names
as failed, so choosing one raises it), unless `RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1`.

Mapping (verl 0.9.1 `core_algos`):
  * `compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
    rollout_is_weights)` -> `ops.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask,
    clip=PPOClip(clip_ratio_low, clip_ratio_high, dual=clip_ratio_c), agg=..., is_weights=rollout_is_weights)`;
    `compute_policy_loss_gspo` -> the same with `PPOClip(level="sequence")` and no dual clip (verl clamps GSPO's
    log ratio at 10 from above, we clamp at [-20, 20]: equal for ratios below e^10).
  * `agg_loss(..., **config.global_batch_info)` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    -> `PPOAgg` with the same normalisers, times dp_size, in all five modes.
  * metrics: verl's own keys and definitions (`actor/pg_clipfrac`, `actor/ppo_kl`, `actor/pg_clipfrac_lower`).
  * `compute_grpo_outcome_advantage` / `compute_rloo_outcome_advantage` /
    `compute_reinforce_plus_plus_baseline_outcome_advantage` -> `ops.group_advantages(scores, uid, mode,
    keep_singletons=True)` (verl's convention for a group of one), expanded over the response mask.
Not covered (use verl's own names): the other loss modes (dppo, sapo, gpg, clip_cov, kl_cov, geo_mean, dro, cispo,
bypass_mode) and estimators (gae, opo, grpo_passk, gdpo, remax, optimal_token_baseline ...); verl's entropy and KL
loss terms stay verl's (`agg_loss`), fed by our log-probs and entropy when the fused path is routed.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import torch

from rlhf_fast import ops
from rlhf_fast.integrations import _versions

SUPPORTED_VERSIONS = ("0.9.1",)  # the verl releases this plug-in is tested against; any other raises (see _versions)
LOSS_MODES = ("rlhf_fast", "rlhf_fast_gspo")
ADV_ESTIMATORS = ("rlhf_fast_grpo", "rlhf_fast_rloo", "rlhf_fast_reinforce_pp_baseline")
_log = logging.getLogger("rlhf_fast.integrations.verl")
_original_fused_linear = None


def check_version() -> str:
    """The installed verl version; `_versions.UnsupportedPeerVersion` unless it is in SUPPORTED_VERSIONS."""
    import verl  # noqa: F401  (its __version__)

    return _versions.check("verl", SUPPORTED_VERSIONS)


def _core_algos():
    from verl.trainer.ppo import core_algos

    return core_algos


# --- policy losses -------------------------------------------------------------------------------------------------

def _global_info(config) -> dict:
    info = dict(getattr(config, "global_batch_info", None) or {})
    return {k: info.get(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")}


def verl_agg(loss_agg_mode: str, response_mask: torch.Tensor, global_batch_info: dict) -> tuple[ops.PPOAgg, int]:
    """(PPOAgg, dp_size) equal to verl's `agg_loss(..., loss_agg_mode, **global_batch_info)`, whose loss is
    `agg.aggregate(...) * dp_size`. response_mask: (batch, T)."""
    dp = int(global_batch_info.get("dp_size") or 1)
    tokens, seqs = global_batch_info.get("batch_num_tokens"), global_batch_info.get("global_batch_size")
    if dp > 1 and loss_agg_mode == "token-mean" and tokens is None:
        raise ValueError("verl: (global) batch_num_tokens is required when dp_size > 1")
    if dp > 1 and loss_agg_mode.startswith("seq-") and seqs is None:
        raise ValueError("verl: global_batch_size is required when dp_size > 1")
    if loss_agg_mode == "token-mean":
        return ops.PPOAgg("token-mean", num_tokens=tokens), dp
    if loss_agg_mode == "token-sum":
        return ops.PPOAgg("token-sum"), dp
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return ops.PPOAgg(loss_agg_mode, num_seqs=seqs), dp
    if loss_agg_mode == "seq-mean-token-sum-norm":
        # verl: sum_b(sum_t l) / global_batch_size / loss_scale_factor (default: the padded length T)
        if seqs is None:
            seqs = (response_mask.bool().sum(-1) > 0).sum()
        scale = global_batch_info.get("loss_scale_factor") or response_mask.shape[-1]
        return ops.PPOAgg("seq-mean-token-sum-norm", norm=torch.as_tensor(seqs, dtype=torch.float64) * scale), dp
    raise ValueError(f"verl loss_agg_mode must be one of {ops.AGG_MODES}, got {loss_agg_mode!r}")


def _clip_ranges(config) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return float(low), float(high)


@torch.no_grad()
def _metrics(old_log_prob, log_prob, advantages, mask, clip: ops.PPOClip) -> dict[str, float]:
    """verl's pg metrics, by verl's definitions (masked means over the response tokens). Masked-out positions are
    selected away (`torch.where`), never multiplied by 0: a NaN/Inf there must not reach a metric (NaN * 0 = NaN),
    as verl's `masked_sum` ensures for its own. (batch, T) inputs."""
    m = mask.bool()
    zero = torch.zeros((), device=m.device)
    n = m.sum().clamp(min=1)
    lr = torch.where(m, (log_prob.detach() - old_log_prob).float(), zero)  # (batch, T)
    if clip.level == "sequence":
        lr = (lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(lr)
    ratio = lr.clamp(max=10.0 if clip.level == "sequence" else 20.0, min=None if clip.level == "sequence"
                     else -20.0).exp()
    adv = torch.where(m, advantages.float(), zero)
    l1, l2 = -adv * ratio, -adv * ratio.clamp(clip.lower, clip.upper)
    clip_lower = zero
    if clip.dual is not None:
        clip_lower = ((torch.maximum(l1, l2) > -adv * clip.dual) & (adv < 0) & m).sum() / n
    kl = torch.where(m, -(log_prob.detach() - old_log_prob).float().clamp(-20, 20), zero)
    return {"actor/pg_clipfrac": ((l2 > l1) & m).sum().div(n).item(),
            "actor/ppo_kl": kl.sum().div(n).item(),
            "actor/pg_clipfrac_lower": clip_lower.item()}


def _policy_loss(level: str):
    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        if config is None:
            raise ValueError("rlhf_fast verl policy loss: config (verl ActorConfig) is required")
        low, high = _clip_ranges(config)
        dual = None
        if level == "token":
            dual = float(config.get("clip_ratio_c", 3.0))
        clip = ops.PPOClip(low=low, high=high, dual=dual, level=level)
        agg, dp = verl_agg(loss_agg_mode, response_mask, _global_info(config))
        loss, _ = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip=clip, agg=agg,
                                      is_weights=rollout_is_weights)
        return loss * dp, _metrics(old_log_prob, log_prob, advantages, response_mask, clip)

    policy_loss.__name__ = policy_loss.__qualname__ = f"rlhf_fast_policy_loss_{level}"
    policy_loss.__doc__ = f"verl policy loss ({level} ratio) on `ops.ppo_policy_loss`: see rlhf_fast.integrations.verl."
    policy_loss._rlhf_fast = True
    return policy_loss


policy_loss = _policy_loss("token")
gspo_policy_loss = _policy_loss("sequence")


# --- advantage estimators ------------------------------------------------------------------------------------------

def _group_ids(index) -> np.ndarray | torch.Tensor:
    if index is None:
        raise ValueError("rlhf_fast advantage estimators need verl's `index` (the per-row uid of its prompt group)")
    if isinstance(index, torch.Tensor):
        return index
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64))


def _option(config, name: str, default):
    if config is not None and hasattr(config, "get"):
        value = config.get(name, None)
        if value is not None:
            return value
    return default


def _estimator(mode: str):
    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                  epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        scores = token_level_rewards.sum(dim=-1)  # (batch,)
        gid = _group_ids(index).to(scores.device)
        scale = "group"
        if mode == "grpo":
            scale = "group" if _option(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo) else "none"
        res = ops.group_advantages(scores, gid, mode, scale=scale, eps=float(epsilon), keep_singletons=True,
                                   mask=response_mask if mode == "reinforce_pp_baseline" else None)
        adv = ops.expand_advantages(res.advantages, response_mask)  # (batch, T)
        return adv, adv

    estimator.__name__ = estimator.__qualname__ = f"rlhf_fast_{mode}_advantage"
    estimator.__doc__ = f"verl advantage estimator on `ops.group_advantages(mode={mode!r})`."
    estimator._rlhf_fast = True
    return estimator


ESTIMATORS = {f"rlhf_fast_{m}": _estimator(m) for m in ("grpo", "rloo", "reinforce_pp_baseline")}
LOSSES = {"rlhf_fast": policy_loss, "rlhf_fast_gspo": gspo_policy_loss}


def _put(registry: dict, name: str, fn, register) -> None:
    if getattr(registry.get(name), "_rlhf_fast", False):
        registry.pop(name)  # ours (or a failure marker of ours) from an earlier call: replace it
    register(name)(fn)


def register() -> None:
    """Register our policy losses and advantage estimators in verl's registries (idempotent). Raises
    `UnsupportedPeerVersion` on a verl release outside SUPPORTED_VERSIONS."""
    check_version()
    ca = _core_algos()
    for name, fn in LOSSES.items():
        _put(ca.POLICY_LOSS_REGISTRY, name, fn, ca.register_policy_loss)
    for name, fn in ESTIMATORS.items():
        _put(ca.ADV_ESTIMATOR_REGISTRY, name, fn, ca.register_adv_est)


def _failed(name: str, err: BaseException):
    def fail(*args, **kwargs):
        raise RuntimeError(f"the rlhf_fast verl plug-in failed to load, so {name!r} is unavailable: "
                           f"{type(err).__name__}: {err}") from err

    fail._rlhf_fast = True
    return fail


def load_plugin() -> None:
    """What the `verl.plugins` entry point runs. verl logs a failing plug-in at DEBUG level only and goes on; here
    a failure is logged as an ERROR, warned, re-raised, and every name of ours that verl can still resolve raises
    the original error when selected, so a run that asked for `rlhf_fast` stops instead of silently training
    without it."""
    try:
        register()
        if os.environ.get("RLHF_FAST_VERL_FUSED_LINEAR", "0") == "1":
            patch_fused_linear()
    except Exception as err:
        _log.error("rlhf_fast verl plug-in failed: %s: %s", type(err).__name__, err)
        warnings.warn(f"rlhf_fast verl plug-in failed: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
        try:
            ca = _core_algos()
            for name in LOSS_MODES:
                _put(ca.POLICY_LOSS_REGISTRY, name, _failed(name, err), ca.register_policy_loss)
            for name in ADV_ESTIMATORS:
                _put(ca.ADV_ESTIMATOR_REGISTRY, name, _failed(name, err), ca.register_adv_est)
        except Exception:  # verl itself does not import: nothing to mark, the original error is raised below
            pass
        raise


# --- fused hidden-state log-probs ----------------------------------------------------------------------------------

class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's `FusedLinearForPPO` (same constructor and forward) on `ops.linear_token_logprobs`.

    forward(hidden_states (..., H), vocab_weights (V, H), input_ids (...), temperature) ->
    (log_probs (...) float32, entropy (...) in the hidden states' dtype), as verl's. chunk_size is passed on as our
    token chunk; impl_backend is accepted and ignored (ours replaces both of verl's).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        logp, ent = ops.linear_token_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                              temperature=float(temperature), return_entropy=True)
        return logp, ent.to(hidden_states.dtype)


def patch_fused_linear() -> None:
    """Route verl's `use_fused_kernels` torch path (`FusedLinearForPPO`, imported by verl's model forwards at call
    time) to `ops.linear_token_logprobs`. Undo with `unpatch_fused_linear()`."""
    global _original_fused_linear
    check_version()
    from verl.utils.experimental import torch_functional as tf

    if tf.FusedLinearForPPO is not FusedLinearForPPO:
        _original_fused_linear = tf.FusedLinearForPPO
        tf.FusedLinearForPPO = FusedLinearForPPO


def unpatch_fused_linear() -> None:
    global _original_fused_linear
    from verl.utils.experimental import torch_functional as tf

    if _original_fused_linear is not None:
        tf.FusedLinearForPPO, _original_fused_linear = _original_fused_linear, None
