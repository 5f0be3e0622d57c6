"""Where the `gpu` tests run and which of their cases a run can afford.

On a CUDA machine: CUDA tensors, every case. With RLHF_FAST_GPU_TESTS_ON_CPU=1 (`python -m bench.gpu_check
--dry-run`, in CI): CPU tensors with the Triton kernels under the interpreter, `tiny` cases only, so the GPU tests
cannot rot before their first GPU; cases marked `cuda_only` (real sizes, CUDA C++ kernels) are skipped there.
"""
import os

import pytest
import torch

from rlhf_fast import _native

ON_CUDA = torch.cuda.is_available()
DRY_RUN = not ON_CUDA and os.environ.get("RLHF_FAST_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

cuda_only = pytest.mark.skipif(not ON_CUDA, reason="real-size or CUDA C++ case: needs a CUDA device")
not_in_dry_run = pytest.mark.skipif(DRY_RUN, reason="dry run: the first case of each test only (CI time)")


def dry_subset(values):
    """`values`, or only its first element in the dry run (for loops inside a test)."""
    return list(values)[:1] if DRY_RUN else list(values)


def first_in_dry_run(*values):
    """pytest params of `values` (plain values or `pytest.param`s) where the dry run keeps only the first (the others
    still run on CUDA)."""
    out = []
    for i, v in enumerate(values):
        if i and isinstance(v, type(pytest.param(0))):
            v = pytest.param(*v.values, marks=(*v.marks, not_in_dry_run), id=v.id)
        elif i:
            v = pytest.param(v, marks=not_in_dry_run)
        out.append(v)
    return out


def native_cuda(name: str):
    """Skip unless `rlhf_fast._C` exports the CUDA kernel `name` (the build step of gpu_check makes it)."""
    return pytest.mark.skipif(not (ON_CUDA and _native.has(name)),
                              reason=f"needs CUDA and rlhf_fast._C built with {name!r}")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 0.0}


def assert_within_twice_torch(kernel, torch_same_dtype, ref64, *, slack: float, what: str) -> None:
    """flash-attention's rule: the kernel's error vs float64 is at most 2x PyTorch's error in the same dtype, plus
    `slack` and one rounding of the output's dtype at the largest magnitude (a 16-bit output's max error is one
    final rounding either way, and which of the two paths rounds luckier is chance)."""
    e_k, e_t = max_err(kernel, ref64), max_err(torch_same_dtype, ref64)
    limit = 2 * e_t + slack + UNIT_ROUNDOFF[kernel.dtype] * float(ref64.abs().max() if ref64.numel() else 0.0)
    assert e_k <= limit, f"{what}: kernel error {e_k:.3g} > {limit:.3g} (2 x torch error {e_t:.3g} + slack)"
