"""OpenRLHF plug-in: drop-in `PolicyLoss` / `ValueLoss` on `ops.ppo_policy_loss` / `ops.value_loss`.

    from rlhf_fast.integrations.openrlhf import PolicyLoss, ValueLoss   # subclasses of openrlhf.models.loss's
    loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = PolicyLoss(0.2, 0.28, dual_clip=3.0)(
        log_probs, old_log_probs, advantages, action_mask=mask, dp_size=..., batch_num_tokens=...)

Same constructors, `forward` signatures and return values as OpenRLHF 0.11.2's (`openrlhf/models/loss.py`):
`PolicyLoss(clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type, is_correction_*)`,
`ValueLoss(clip_eps, token_level_loss)`; `aggregate_loss`'s token-level (`batch_num_tokens`) and per-sample
(`global_batch_size`) modes with `dp_size` map to `PPOAgg` token-mean / seq-mean-token-mean. Covered:
`policy_loss_type` "ppo" (token ratio, optional dual clip) and "gspo" (sequence ratio; OpenRLHF differentiates
the sequence mean itself, which has our stop-gradient form's gradient when the advantage is constant over each
sequence, as GRPO's is), with `is_correction_level="off"`. The rollout-mismatch corrections
(`is_correction_level` token / seq: TIS, ICEPOP, binary-KL / TV gates) run OpenRLHF's own `forward`.

`patch()` puts both classes in place of OpenRLHF's (`openrlhf.models`, `openrlhf.models.loss` and the Ray actor /
critic modules if already imported), e.g. in every Ray worker with
`ray.init(runtime_env={"worker_process_setup_hook": "rlhf_fast.integrations.openrlhf.patch"})`.
Nothing of OpenRLHF is imported or changed before `PolicyLoss` / `ValueLoss` / `patch()` is used. Supported
OpenRLHF releases: `SUPPORTED_VERSIONS` (exactly those the tests run against); on any other, the first of these
raises `rlhf_fast.integrations._versions.UnsupportedPeerVersion` naming both, unless
`RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1`.
"""
from __future__ import annotations

import sys

import torch

from rlhf_fast import ops
from rlhf_fast.integrations import _versions

SUPPORTED_VERSIONS = ("0.11.2",)  # the OpenRLHF releases this plug-in is tested against; any other raises
_USERS = ("openrlhf.models", "openrlhf.models.loss", "openrlhf.trainer.ray.ppo_actor",
          "openrlhf.trainer.ray.ppo_critic")
_originals: dict[str, tuple] = {}


def _agg(token_level: bool, dp_size, batch_num_tokens, global_batch_size) -> tuple[ops.PPOAgg, float]:
    """(PPOAgg, factor) with loss = factor * agg.aggregate(...) equal to OpenRLHF's `aggregate_loss`."""
    if token_level:
        if batch_num_tokens is None:
            return ops.PPOAgg("token-mean"), 1.0
        return ops.PPOAgg("token-mean", num_tokens=batch_num_tokens), dp_size
    if global_batch_size is None:
        return ops.PPOAgg("seq-mean-token-mean"), 1.0
    return ops.PPOAgg("seq-mean-token-mean", num_seqs=global_batch_size), dp_size


@torch.no_grad()
def _policy_stats(log_probs, old_log_probs, advantages, mask, clip: ops.PPOClip):
    """OpenRLHF's clip_ratio (fraction of tokens where the clipped surrogate is the smaller) and ppo_kl, (batch, T)
    inputs. Masked-out positions are selected away (`torch.where`), never multiplied by 0, so a NaN/Inf there does
    not reach a statistic (OpenRLHF's own `masked_mean` multiplies: NaN * 0 = NaN)."""
    m = mask.bool()
    zero = torch.zeros((), device=m.device)
    lr = torch.where(m, (log_probs - old_log_probs).float(), zero)  # (batch, T)
    if clip.level == "sequence":
        ratio = (lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).exp().expand_as(lr)
    else:
        ratio = lr.clamp(-20.0, 20.0).exp()
    adv = torch.where(m, advantages.float(), zero)
    surr1, surr2 = ratio * adv, ratio.clamp(clip.lower, clip.upper) * adv
    n = m.sum()
    return ((surr2 < surr1) & m).sum() / n, -lr.sum() / n


def check_version() -> str:
    """The installed OpenRLHF version; `_versions.UnsupportedPeerVersion` unless it is in SUPPORTED_VERSIONS."""
    return _versions.check("openrlhf", SUPPORTED_VERSIONS)


def _loss_module():
    check_version()
    from openrlhf.models import loss

    return loss


def _make_classes():
    peer = _loss_module()

    class PolicyLoss(peer.PolicyLoss):
        """openrlhf.models.loss.PolicyLoss on `ops.ppo_policy_loss` (see rlhf_fast.integrations.openrlhf)."""

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            if self.is_correction_level != "off" or self.policy_loss_type not in ("ppo", "gspo"):
                return super().forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs,
                                       dp_size, batch_num_tokens, global_batch_size)
            mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
            clip = ops.PPOClip(low=self.clip_eps_low, high=self.clip_eps_high, dual=self.dual_clip,
                               level="sequence" if self.policy_loss_type == "gspo" else "token")
            agg, factor = _agg(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
            loss, _ = ops.ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip=clip, agg=agg)
            clip_ratio, ppo_kl = _policy_stats(log_probs.detach(), old_log_probs, advantages, mask, clip)
            return loss * factor, clip_ratio, ppo_kl, None, None

    class ValueLoss(peer.ValueLoss):
        """openrlhf.models.loss.ValueLoss on `ops.value_loss` (see rlhf_fast.integrations.openrlhf)."""

        def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                    global_batch_size=None):
            mask = torch.ones_like(values, dtype=torch.bool) if action_mask is None else action_mask
            agg, factor = _agg(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
            loss, _ = ops.value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)
            return loss * factor

    for cls in (PolicyLoss, ValueLoss):
        cls.__module__ = __name__
    return PolicyLoss, ValueLoss


def patch() -> None:
    """Use our PolicyLoss / ValueLoss wherever OpenRLHF looks them up (idempotent; `unpatch()` undoes it)."""
    policy, value = __getattr__("PolicyLoss"), __getattr__("ValueLoss")
    for name in _USERS:
        mod = sys.modules.get(name)
        if mod is None or name in _originals:
            continue
        _originals[name] = (getattr(mod, "PolicyLoss", None), getattr(mod, "ValueLoss", None))
        for attr, cls in (("PolicyLoss", policy), ("ValueLoss", value)):
            if hasattr(mod, attr) or name in ("openrlhf.models", "openrlhf.models.loss"):
                setattr(mod, attr, cls)


def unpatch() -> None:
    for name, pair in list(_originals.items()):
        mod = sys.modules.get(name)
        for attr, cls in zip(("PolicyLoss", "ValueLoss"), pair):
            if mod is None:
                continue
            if cls is not None:
                setattr(mod, attr, cls)
            elif hasattr(mod, attr):
                delattr(mod, attr)
        del _originals[name]


def __getattr__(name):
    # OpenRLHF is imported only when a class is first asked for
    if name in ("PolicyLoss", "ValueLoss"):
        if name not in globals():
            policy, value = _make_classes()
            globals().update(PolicyLoss=policy, ValueLoss=value)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
