"""Token sampling: greedy, temperature, top-k, top-p, each row with its own generator (reproducible per request).

Top-k / top-p cut the distribution at one threshold per row (`ops.support_threshold`: the k-th largest scaled logit
with its ties, then the smallest nucleus reaching top_p with the token that crosses it); the engine returns the
sampled token's log-prob under that cut distribution and records the threshold, so the trainer can compute the
same distribution's log-probs (recomputed or replayed).

A sampled token is the inverse CDF of the (filtered) distribution at one uniform drawn from the row's own generator:
tokens outside the kept set have zero-width CDF steps and can never be drawn, and a row's draw depends only on its
own generator, never on the batch it is in. On CPU (float32) the draw runs in csrc/sampling.cpp, one row at a time
in cache (max, chunked weight sums, scan to the threshold); elsewhere as torch max / exp / cumsum / searchsorted.
"""
from __future__ import annotations

import torch

from rlhf_fast import _native


def keep_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) bool: the tokens top-k and top-p keep for logits (B, V) (already divided by the temperature), by sorting;
    an independent check of `ops.support_threshold` (which the sampler uses) where no two logits tie.

    top-k keeps the k largest; top-p then keeps the smallest prefix of the sorted distribution whose probability
    reaches top_p (the most likely token is always kept).
    """
    v = logits.shape[-1]
    if (top_k == 0 or top_k >= v) and top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    if 0 < top_k < v:  # only the k candidates need sorting
        sorted_logits, order = logits.topk(top_k, dim=-1)  # (B, k), descending
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        keep_sorted &= mass_before < top_p
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)


def sample(logits: torch.Tensor, temperature: float, generators: list[torch.Generator],
           threshold: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) float32 -> tokens (B,) int64. temperature 0 = greedy (argmax, first index on ties).

    threshold (B,): the support per row (`ops.support_threshold` of these logits at this temperature, top-k and
    top-p): tokens with logits * (1 / temperature) < threshold are never drawn. The scaled logits are computed as the
    log-prob ops compute z, so the support sampled from is exactly the one `ops.token_logprobs` renormalises over.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() * (1.0 / temperature) if temperature != 1.0 else logits.float()  # x * 1 == x exactly
    if threshold is not None:
        scaled = scaled.masked_fill(scaled < threshold.to(scaled.dtype)[:, None], float("-inf"))
    # one uniform per row from the row's own generator: inverse-CDF sampling
    u = torch.stack([torch.rand((), device=logits.device, generator=g) for g in generators])  # (B,)
    if scaled.device.type == "cpu" and scaled.dtype == torch.float32 and _native.has("sample_rows_cpu"):
        return _sample_rows_native(scaled, u)
    weights = (scaled - scaled.max(dim=-1, keepdim=True).values).exp_()  # (B, V) unnormalised probabilities
    cdf = weights.cumsum_(dim=-1)  # (B, V); cdf[:, -1] is the normaliser
    u = (u * cdf[:, -1])[:, None]  # (B, 1), scaled into [0, total)
    # first index with cdf > u: token i has cdf[i] > u >= cdf[i - 1], so w_i > 0 (dropped tokens, w = 0, never win)
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(scaled.shape[-1] - 1)


def _sample_rows_native(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """csrc/sampling.cpp: the same inverse CDF, each row's max / weights / scan in one pass over it in cache."""
    if scaled.stride(-1) != 1:
        scaled = scaled.contiguous()
    out = torch.empty(scaled.shape[0], dtype=torch.int64)
    _native.fn("sample_rows_cpu")(scaled.data_ptr(), scaled.shape[0], scaled.shape[1], scaled.stride(0),
                                  u.contiguous().data_ptr(), out.data_ptr())
    return out


def replay_threshold(logits: torch.Tensor, temperature: float, thr: torch.Tensor) -> torch.Tensor:
    """The threshold a trainer replays, (...,): halfway between the support's smallest scaled logit (`thr`, a value of
    the row) and the largest one below it. It selects the same tokens on these logits, and the same ones on a
    trainer's logits that differ by rounding (the exact `thr` would drop the boundary token whenever the trainer's
    copy of it comes out an ulp lower)."""
    z = logits.float() * (1.0 / temperature)  # (..., V), as the ops compute z
    below = torch.where(z < thr[..., None], z, float("-inf")).amax(-1)  # (...,)
    mid = (thr + below) * 0.5
    return torch.where(torch.isfinite(below) & (mid > below), mid, thr)

