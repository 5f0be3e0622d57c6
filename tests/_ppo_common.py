"""Shared helpers for the PPO-math tests (KL, losses, stats, GAE, rewards)."""
import pytest
import torch

from rlhf_fast.backend import triton_available, triton_interpret

HAS_TRITON = triton_available() and (torch.cuda.is_available() or triton_interpret())
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
