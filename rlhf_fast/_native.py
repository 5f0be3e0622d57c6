"""The compiled extension `rlhf_fast._C`, if it was built, and the conventions for calling it.

`_C` links no libtorch: its functions take `tensor.data_ptr()` integers, sizes, a dtype code and (for CUDA) a
stream handle. Ops wrap these calls in `torch.library.custom_op` after checking device, dtype, contiguity and shape.
"""
from __future__ import annotations

import torch

try:
    from rlhf_fast import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as e:  # built without a compiler, or not built yet
    _C = None
    IMPORT_ERROR = str(e)

# Must match `enum DType` in csrc/common.h.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def available() -> bool:
    return _C is not None


def has(name: str) -> bool:
    """True when the extension was built and exports `name`."""
    return _C is not None and hasattr(_C, name)


def fn(name: str):
    if not has(name):
        raise RuntimeError(f"rlhf_fast._C has no function {name!r} (extension built: {available()}; "
                           f"import error: {IMPORT_ERROR})")
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
