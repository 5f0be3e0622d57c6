"""Pure-PyTorch reference of every op in `rlhf_fast.ops`.

This file is the test oracle (run in float64), the benchmark baseline and the fallback backend. Each function is
written for clarity, not speed: it may materialise full tensors that the kernels avoid. Keep one section per area.
"""
from __future__ import annotations

import torch  # noqa: F401

# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy (token_logprobs, linear_token_logprobs)
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# KL estimators, PPO policy and value losses, masked statistics, token rewards
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Generalized advantage estimation
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Paged KV cache and paged-attention decode
# ---------------------------------------------------------------------------------------------------------------
