"""Argument checks shared by every op: each error names the argument, what it got and what was expected."""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = None, ndim: int | None = None,
                 min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({want}); got {desc(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got {desc(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims; got {desc(t)}")


def check_float(name: str, t, **kw) -> None:
    check_tensor(name, t, dtypes=FLOAT_DTYPES, **kw)


def check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    ref = tensors[0].shape
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != ref:
            raise ValueError(f"{n} must have the same shape as {names[0]} {tuple(ref)}; got {desc(t)}")


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    pairs = [(n, t) for n, t in zip(names, tensors) if t is not None]
    dev = pairs[0][1].device
    for n, t in pairs[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {pairs[0][0]} is on {dev}; all tensors must share a device")


def check_mask(name: str, mask: torch.Tensor) -> None:
    """A 0/1 mask (bool, int or float). Non-binary values are an error, not a silent weight."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must contain only 0 and 1; found values such as {bad} ({desc(mask)})")

