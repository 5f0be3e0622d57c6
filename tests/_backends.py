"""The backends a test runs an op on, defined once: `torch` always, `native` where `rlhf_fast._C` has the kernel,
`triton` on CUDA or under TRITON_INTERPRET=1."""
import pytest
import torch

from rlhf_fast import _native
from rlhf_fast.backend import registered_ops, triton_available, triton_interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = triton_available() and (torch.cuda.is_available() or triton_interpret())
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1"))


def native(kernel: str, *, cpu_only: bool = False):
    """The `native` backend, skipped unless `rlhf_fast._C` has `kernel` (and, with `cpu_only`, off CUDA)."""
    missing = not _native.has(kernel) or (cpu_only and DEVICE != "cpu")
    return pytest.param("native", marks=pytest.mark.skipif(missing, reason=f"rlhf_fast._C lacks {kernel} here"))


def needs_triton(op: str):
    """Skip a test unless op `op` has a Triton kernel that can run here."""
    return pytest.mark.skipif(not (registered_ops()[op].triton and HAS_TRITON),
                              reason=f"needs a Triton {op} on CUDA or TRITON_INTERPRET=1")


NATIVE_LOGPROBS = native("token_logprobs_fwd_cpu")
LOGPROB_BACKENDS = ["torch", NATIVE_LOGPROBS]  # the log-prob ops: torch and native; Triton tested on its own
