"""Compile the PPO-math Triton kernels for sm_90 without a GPU (run in a subprocess without TRITON_INTERPRET).

The interpreter accepts things compiled Triton rejects (plain Python globals, some dtype mixes), so the tests
compile each kernel to PTX once, for one representative specialisation, and fail on any compiler error.
"""
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton.language as tl  # noqa: E402

from rlhf_fast.kernels import gae as kg  # noqa: E402
from rlhf_fast.kernels import ppo_losses as kp  # noqa: E402
from rlhf_fast.kernels import whiten as kw  # noqa: E402
from _triton_ptx import main  # noqa: E402  (this script's own folder is on sys.path)


SC = dict(lo_hi="fp32", lo_lo="fp32", hi_hi="fp32", hi_lo="fp32", dual_hi="fp32", dual_lo="fp32")
KERNELS = [
    (kg._gae_kernel, dict(R="*fp32", V="*fp32", M="*u8", CU="*i64", ADV="*fp32", RET="*fp32", STATS="*fp32",
                          gamma_hi="fp32", gamma_lo="fp32", lam_hi="fp32", lam_lo="fp32"),
     dict(WITH_STATS=True, BLOCK=1024, ACC=tl.float32)),
    (kw._row_moments_kernel, dict(X="*bf16", M="*u8", CU="*i64", STATS="*fp32"), dict(BLOCK=1024, ACC=tl.float32)),
    (kw._normalize_kernel, dict(X="*fp32", M="*u8", OUT="*fp32", CU="*i64", STATS="*fp32", n_rows="i32", eps="fp32"),
     dict(SHIFT_MEAN=False, BLOCK=1024, SBLOCK=64, ACC=tl.float32)),
    (kp._kl_fwd_kernel, dict(LOGP="*bf16", REF="*bf16", OUT="*bf16", n="i32"),
     dict(KIND=2, BLOCK=1024, ACC=tl.float32)),
    (kp._kl_bwd_kernel, dict(LOGP="*fp32", REF="*fp32", G="*fp32", DLR="*fp32", n="i32"),
     dict(KIND=2, BLOCK=1024, ACC=tl.float32)),
    (kp._policy_fwd_kernel, dict(LOGP="*bf16", OLD="*fp32", ADV="*fp32", ISW="*fp32", MASK="*u8", PART="*fp32",
                                 T="i32", n_chunks="i32", **SC),
     dict(HAS_DUAL=True, HAS_IS=True, LR_GIVEN=True, BLOCK=1024, ACC=tl.float32)),
    (kp._policy_bwd_kernel, dict(LOGP="*bf16", OLD="*fp32", ADV="*fp32", ISW="*bf16", MASK="*u8", W="*fp32",
                                 GRAD="*bf16", T="i32", **SC),
     dict(HAS_DUAL=True, HAS_IS=True, LR_GIVEN=False, BLOCK=1024, ACC=tl.float32)),
    (kp._value_fwd_kernel, dict(V="*fp32", VOLD="*fp32", RET="*fp32", MASK="*u8", PART="*fp32", T="i32",
                                n_chunks="i32", clip_hi="fp32", clip_lo="fp32"),
     dict(HAS_CLIP=True, BLOCK=1024, ACC=tl.float32)),
    (kp._value_bwd_kernel, dict(V="*fp64", VOLD="*fp64", RET="*fp64", MASK="*u8", W="*fp64", GRAD="*fp64", T="i32",
                                clip_hi="fp32", clip_lo="fp32"), dict(HAS_CLIP=True, BLOCK=1024, ACC=tl.float64)),
]

if __name__ == "__main__":
    main((fn, sig, consts) for fn, sig, consts in KERNELS)
