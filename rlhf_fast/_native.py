"""The compiled extension `rlhf_fast._C`, if it was built, and the conventions for calling it.

`_C` links no libtorch: its functions take `tensor.data_ptr()` integers, sizes, a dtype code and (for CUDA) a
stream handle. Every op calls them through `call`, which checks each tensor argument (`arg`: device, dtype,
contiguity) and expands it into its pointer (and dtype code), so a wrong tensor is an error naming the argument
instead of a segfault. Ops wrap these calls in `torch.library.custom_op` after checking shapes.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

try:
    from rlhf_fast import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as e:  # built without a compiler, or not built yet
    _C = None
    IMPORT_ERROR = str(e)
    warnings.warn(f"rlhf_fast._C (the native CPU/CUDA kernels) is not available ({e}); ops fall back to their "
                  f"Triton or PyTorch backends. Rebuild with `pip install -e .` to get them", RuntimeWarning,
                  stacklevel=2)

# Must match `enum DType` in csrc/common.h.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
FLOATS = tuple(DTYPE_CODE)


def available() -> bool:
    return _C is not None


def has(name: str) -> bool:
    """True when the extension was built and exports `name`."""
    return _C is not None and hasattr(_C, name)


_threads = 0  # the thread count last passed to the extension


def fn(name: str):
    """The `_C` function `name`, looked up at the call: its CPU kernels then run on `torch.get_num_threads()`
    threads. The extension's OpenMP runtime is the system's, not the copy torch loads, so without this a process
    that set torch to one thread would still run them on every core."""
    global _threads
    if not has(name):
        raise RuntimeError(f"rlhf_fast._C has no function {name!r} (extension built: {available()}; "
                           f"import error: {IMPORT_ERROR})")
    n = torch.get_num_threads()
    if n != _threads and hasattr(_C, "set_num_threads"):
        _C.set_num_threads(n)
        _threads = n
    return getattr(_C, name)


def built_with_cuda() -> bool:
    return bool(_C is not None and getattr(_C, "built_with_cuda", False))


def built_with_openmp() -> bool:
    return bool(_C is not None and getattr(_C, "built_with_openmp", False))


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels take float32/float16/bfloat16/float64 tensors, got {t.dtype}") from None


def stream_handle(t: torch.Tensor) -> int:
    """The current CUDA stream of `t`'s device as an integer (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


class Arg(NamedTuple):
    """A tensor argument of a `_C` function (see `arg`)."""

    name: str
    tensor: torch.Tensor
    dtypes: tuple[torch.dtype, ...]
    code: bool


def arg(name: str, tensor: torch.Tensor, dtypes: torch.dtype | tuple[torch.dtype, ...] = FLOATS, *,
        code: bool = False) -> Arg:
    """The tensor argument `name` of a `_C` call: it must be contiguous with a dtype in `dtypes`; it expands into
    (data_ptr,), or (data_ptr, dtype code) with `code=True` (where the C function takes the dtype after the pointer)."""
    return Arg(name, tensor, dtypes if isinstance(dtypes, tuple) else (dtypes,), code)


def _expand(fn_name: str, a: Arg, device: torch.device | None) -> tuple[int, ...]:
    t = a.tensor
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn_name}: {a.name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in a.dtypes or t.device != device or not t.is_contiguous():
        what = f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
        if t.dtype not in a.dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in a.dtypes)
            raise TypeError(f"{fn_name}: {a.name} must have dtype in ({want}); got {what}")
        if t.device != device:
            raise ValueError(f"{fn_name}: {a.name} must be on {device} (like the call's first tensor); got {what}")
        raise ValueError(f"{fn_name}: {a.name} must be contiguous; got strides {t.stride()} ({what})")
    return (t.data_ptr(), DTYPE_CODE[t.dtype]) if a.code else (t.data_ptr(),)


def call(fn_name: str, *args):
    """Call `_C.<fn_name>(*args)`, each `Arg` checked and expanded into its pointer (and dtype code); other
    arguments (sizes, scalars) pass unchanged. Tensors must share one device, of the type the name ends with
    (`_cpu` / `_cuda`); a `_cuda` function also gets the current CUDA stream of that device as its last argument."""
    f = fn(fn_name)
    tensors = [a.tensor for a in args if isinstance(a, Arg) and isinstance(a.tensor, torch.Tensor)]
    device = tensors[0].device if tensors else None
    kind = fn_name.rsplit("_", 1)[-1]
    if device is not None and kind in ("cpu", "cuda") and device.type != kind:
        first = next(a for a in args if isinstance(a, Arg))
        raise ValueError(f"{fn_name}: {first.name} must be a {kind} tensor; got device {device}")
    flat: list = []
    for a in args:
        flat.extend(_expand(fn_name, a, device) if isinstance(a, Arg) else (a,))
    if kind == "cuda":
        flat.append(stream_handle(tensors[0]))
    return f(*flat)
