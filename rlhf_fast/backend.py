"""Which implementation runs an op: the one small place where backends are chosen.

Order of preference, per call:
  * CUDA tensors: Triton kernel, else native CUDA (`_C`), else the PyTorch reference.
  * CPU tensors: native C++ (`_C`), else the PyTorch reference. Triton runs on CPU tensors only when forced and
    `TRITON_INTERPRET=1` (how the tests run the Triton kernels without a GPU).
`RLHF_FAST_BACKEND=torch|triton|native`, or `with use_backend(...)`, forces one; forcing an unavailable backend
is an error that says why, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os

import torch

from rlhf_fast import _native

BACKENDS = ("triton", "native", "torch")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlhf_fast_backend", default=None)


@dataclasses.dataclass(frozen=True)
class OpBackends:
    """What exists for one op: a Triton kernel, native function names per device, always a torch reference."""

    name: str
    triton: bool = False
    native_cpu: str | None = None  # name of the `_C` function for CPU tensors
    native_cuda: str | None = None  # name of the `_C` function for CUDA tensors


_OPS: dict[str, OpBackends] = {}


def register_op(name: str, *, triton: bool = False, native_cpu: str | None = None,
                native_cuda: str | None = None) -> OpBackends:
    """Declare an op's backends (called once at import of its `rlhf_fast.ops` module)."""
    spec = OpBackends(name, triton, native_cpu, native_cuda)
    _OPS[name] = spec
    return spec


def registered_ops() -> dict[str, OpBackends]:
    return dict(_OPS)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    name = _override.get() or os.environ.get("RLHF_FAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"RLHF_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside the block (`None` restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _native_name(spec: OpBackends, device: torch.device) -> str | None:
    return spec.native_cuda if device.type == "cuda" else spec.native_cpu


def _why_unavailable(spec: OpBackends, backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        if not spec.triton:
            return f"op {spec.name!r} has no Triton kernel"
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpret():
            return f"Triton kernels need CUDA tensors (got {device}) or TRITON_INTERPRET=1"
        return None
    native = _native_name(spec, device)
    if native is None:
        return f"op {spec.name!r} has no native kernel for {device.type} tensors"
    if not _native.has(native):
        return f"rlhf_fast._C lacks {native!r} (extension built: {_native.available()})"
    return None


@torch.compiler.assume_constant_result  # traced once: a compiled graph keeps the backend it was built with
def select(op: str, device: torch.device | str) -> str:
    """The backend that runs `op` on tensors living on `device`."""
    spec = _OPS[op]
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        why = _why_unavailable(spec, forced, device)
        if why is not None:
            raise RuntimeError(f"backend {forced!r} forced for {op!r} but unavailable: {why}")
        return forced
    order = ("triton", "native", "torch") if device.type == "cuda" else ("native", "torch")
    for b in order:
        if _why_unavailable(spec, b, device) is None:
            return b
    return "torch"


def describe(device: torch.device | str) -> dict[str, str]:
    """`{op: backend}` for every registered op on `device` (used by `rlhf-fast env`)."""
    out = {}
    for name in sorted(_OPS):
        try:
            out[name] = select(name, device)
        except RuntimeError as e:
            out[name] = f"error: {e}"
    return out
