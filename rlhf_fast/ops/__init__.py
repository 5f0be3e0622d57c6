"""Public functional API: every kernel meets autograd here, and only here.

Each op picks its backend through `rlhf_fast.backend.select`; `rlhf_fast.ops.reference` holds the PyTorch version.
"""
from rlhf_fast.backend import use_backend  # noqa: F401

# --- log-probabilities and entropy ---
from rlhf_fast.ops.logprobs import linear_token_logprobs, token_logprobs  # noqa: F401,E402

# --- KL, PPO policy/value losses, masked statistics, token rewards ---

# --- GAE ---

# --- fused PPO step ---

# --- paged attention / KV cache ---
