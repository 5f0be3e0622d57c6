"""Philox4x32-10, a counter-based random number generator, in plain torch integer ops (vectorised over rows).

Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011); the reference is Random123's
`philox4x32_R(10, ctr, key)`. A draw is a pure function of its (counter, key): the engine keys it by the request's
seed and counts by (position, sequence index), so a sequence's draws do not depend on which rows share its batch or
bucket, and need no generator state, no per-row launch and no host round trip (the step can be compiled and
captured as a CUDA graph).

uint32 arithmetic is emulated in int64 (torch has no uint32 multiply on every device): words are held in [0, 2^32),
and the 32 x 32 -> 64-bit product splits its constant into 16-bit halves so no partial product passes 2^49.
"""
from __future__ import annotations

import torch

MASK = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl sequence) increments
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) 32-bit words of a * b for a constant a < 2^32 and words b (int64 in [0, 2^32))."""
    p_lo = b * (a & 0xFFFF)  # < 2^48
    p_hi = b * (a >> 16)  # < 2^48; a * b = p_hi * 2^16 + p_lo
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49: the low 48 bits of the sum
    return s & MASK, (p_hi >> 16) + (s >> 32)


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """counter (..., 4), key (..., 2) int64 words in [0, 2^32) (broadcast against each other) -> (..., 4) int64 words.

    Each round: (c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key gains
    (W0, W1) (mod 2^32) before every round but the first.
    """
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        lo0, hi0 = _mulhilo(M0, c0)
        lo1, hi1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), -1)


def seed_key(seed: int, device: torch.device) -> torch.Tensor:
    """(2,) int64: a request seed (any int, taken mod 2^64) as a Philox key."""
    seed &= 2**64 - 1
    return torch.tensor([seed & MASK, seed >> 32], dtype=torch.int64, device=device)


def uniform(key: torch.Tensor, streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform float32 in [0, 1) per row: the top 24 bits of the first word of Philox(counter, key) with counter
    (position, stream mod 2^32, stream >> 32, 0). key (2,) from `seed_key`; streams, positions (B,) int >= 0.
    Every float32 multiple of 2^-24 in [0, 1) is equally likely (as `torch.rand`'s float32)."""
    s, p = streams.long(), positions.long()
    counter = torch.stack([p & MASK, s & MASK, s >> 32, torch.zeros_like(s)], -1)  # (B, 4)
    word = philox4x32(counter, key.long())[..., 0]  # (B,)
    return (word >> 8).float() * 2.0**-24
