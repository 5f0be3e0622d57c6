"""Token sampling: greedy, temperature, top-k, top-p, each row with its own generator (reproducible per request).

A sampled token is `argmax(p / e)` with `e ~ Exp(1)` drawn from the row's generator (the exponential race, equal in
law to drawing from `p`): tokens outside the kept set have `p = 0` and can never win, and a row's draw depends only
on its own generator, never on the batch it is in.
"""
from __future__ import annotations

import torch


def keep_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) bool: the tokens top-k and top-p keep for logits (B, V) (already divided by the temperature).

    top-k keeps the k largest; top-p then keeps the smallest prefix of the sorted distribution whose probability
    reaches top_p (the most likely token is always kept).
    """
    v = logits.shape[-1]
    if (top_k == 0 or top_k >= v) and top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if 0 < top_k < v:
        keep_sorted[:, top_k:] = False
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits.masked_fill(~keep_sorted, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        keep_sorted &= mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generators: list[torch.Generator]) -> torch.Tensor:
    """logits (B, V) float32 -> tokens (B,) int64. temperature 0 = greedy (argmax, first index on ties)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    keep = keep_mask(scaled, top_k, top_p)
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)  # (B, V)
    noise = torch.stack([torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g)
                         for g in generators])  # (B, V), row b from generators[b]
    noise = noise.clamp_min(torch.finfo(noise.dtype).tiny)  # never 0/0 for a dropped token
    return (probs / noise).argmax(dim=-1)
