"""Shared masks for the PPO-math tests (KL, losses, stats, GAE, rewards); the backends are in `_backends`."""
import torch
from _backends import DEVICE


def random_mask(b: int, t: int, *, p: float = 0.7, empty_rows=(), device=DEVICE) -> torch.Tensor:
    """(b, t) bool mask with random holes and the given rows fully masked."""
    m = torch.rand(b, t, device=device) < p
    for r in empty_rows:
        m[r] = False
    return m


def padded_mask(lengths, t: int, *, left: bool, device=DEVICE) -> torch.Tensor:
    """(len(lengths), t) bool mask: each row's `length` valid tokens, left- or right-aligned."""
    pos = torch.arange(t, device=device)
    n = torch.tensor(lengths, device=device)[:, None]
    return pos >= t - n if left else pos < n
