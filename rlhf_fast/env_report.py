"""`rlhf-fast env`: what this installation can use, and which backend each op will run on."""
from __future__ import annotations

import importlib
import platform

import torch

from rlhf_fast import _native, backend


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception:
        return "not installed"


def _cuda_kernels(cuda: bool) -> str:
    if not _native.built_with_cuda():
        return "not compiled"
    return "compiled" if cuda else "compiled, no device"


def report() -> dict:
    import rlhf_fast.ops  # noqa: F401  (registers every op's backends)

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash_attn"),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else "none",
        "native_extension": "built" if _native.available() else f"not built ({_native.IMPORT_ERROR})",
        "native_cpu_kernels": _native.available(),
        "native_cuda_kernels": _cuda_kernels(cuda),
        "native_openmp": _native.built_with_openmp(),
        "triton_interpret": backend.triton_interpret(),
        "forced_backend": backend.forced_backend() or "auto",
        "ops_on_cpu": backend.describe("cpu"),
    }
    if cuda:
        info["ops_on_cuda"] = backend.describe("cuda")
    return info


def format_report(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines.extend(f"  {op:<28} {b}" for op, b in v.items())
        else:
            lines.append(f"{k:<20} {v}")
    return "\n".join(lines)
