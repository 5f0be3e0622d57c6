"""Pure-PyTorch reference of every op in `rlhf_fast.ops`.

This file is the test oracle (run in float64), the benchmark baseline and the fallback backend. Each function is
written for clarity, not speed: it may materialise full tensors that the kernels avoid. Keep one section per area.
"""
from __future__ import annotations

import torch  # noqa: F401

# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy (token_logprobs, linear_token_logprobs)
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False):
    """`log softmax(logits / temperature)[label]` and optionally the entropy of that distribution.

    logits (..., V) float; labels (...) int. Returns logp (...) [, entropy (...)] in fp32 (fp64 for fp64 logits).
    Rows whose label is `ignore_index` give 0 for both (and receive zero gradient).
    """
    z = logits.to(_compute_dtype(logits)) / temperature  # (..., V)
    logp_all = z.log_softmax(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (...)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    plogp = torch.where(p > 0, p * logp_all, torch.zeros_like(p))
    entropy = torch.where(valid, -plogp.sum(-1), torch.zeros_like(logp))
    return logp, entropy


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False):
    """`token_logprobs(hidden @ weight.T + bias, labels)`, materialising the full logits (the naive path).

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...). Same outputs as `token_logprobs`.
    """
    logits = hidden @ weight.t()  # (..., V)
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


# ---------------------------------------------------------------------------------------------------------------
# KL estimators, PPO policy and value losses, masked statistics, token rewards
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Generalized advantage estimation
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Paged KV cache and paged-attention decode
# ---------------------------------------------------------------------------------------------------------------
