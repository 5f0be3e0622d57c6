"""Public functional API: every kernel meets autograd here, and only here.

Each op picks its backend through `rlhf_fast.backend.select`; `rlhf_fast.ops.reference` holds the PyTorch version.
"""
from rlhf_fast.backend import use_backend  # noqa: F401

# --- log-probabilities and entropy ---
from rlhf_fast.ops.logprobs import linear_token_logprobs, token_logprobs  # noqa: F401,E402
from rlhf_fast.ops.support import support_threshold  # noqa: F401,E402 (top-k / top-p support)

# --- the loss specification (clipping, aggregation, KL term) every loss op takes ---
from rlhf_fast.ops.loss_spec import (AGG_MODES, KL_KINDS, ROLLOUT_CORRECTION_MODES, KLTerm, PPOAgg,  # noqa: F401,E402
                                     PPOClip, RolloutCorrection)

# --- rollout correction: importance weights / rejection for rollout-vs-trainer log-prob mismatch ---
from rlhf_fast.ops.rollout_correction import RolloutCorrectionStats, rollout_correction  # noqa: F401,E402

# --- KL, PPO policy/value losses, masked statistics, token rewards ---
from rlhf_fast.ops.kl import kl_penalty  # noqa: F401,E402
from rlhf_fast.ops.losses import PolicyLossStats, ValueLossStats, ppo_policy_loss, value_loss  # noqa: F401,E402
from rlhf_fast.ops.rewards import token_rewards  # noqa: F401,E402
from rlhf_fast.ops.stats import masked_mean, masked_var, masked_whiten  # noqa: F401,E402

# --- GAE ---
from rlhf_fast.ops.gae import gae, gae_packed  # noqa: F401,E402

# --- fused PPO step ---
from rlhf_fast.ops.fused_ppo import FusedPPOStats, ppo_loss_from_hidden  # noqa: F401,E402

# --- paged attention / KV cache ---
from rlhf_fast.ops.paged_attention import copy_blocks, paged_attention, store_kv_cache  # noqa: F401,E402

# --- critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++, ReMax) ---
from rlhf_fast.ops.advantages import (GroupAdvantages, expand_advantages, group_advantages,  # noqa: F401,E402
                                      reinforce_pp_advantages, remax_advantages)
