"""Compile the group-advantage Triton kernels for sm_90 without a GPU (run in a subprocess without
TRITON_INTERPRET; see tests/_compile_ppo_kernels.py)."""
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton.language as tl  # noqa: E402

from rlhf_fast.kernels import group_advantages as kga  # noqa: E402
from _triton_ptx import main  # noqa: E402  (this script's own folder is on sys.path)

MOMENTS = dict(S="*bf16", PERM="*i64", OFF="*i64", W="*fp32", STATS="*fp32", MEAN="*fp32", STD="*fp32")
ADV = dict(S="*fp32", IDX="*i64", STATS="*fp32", STD="*fp32", ADV="*fp32", n_rows="i32", n_groups="i32", eps="fp32",
           whiten_eps="fp32")
KERNELS = [
    (kga._group_moments_kernel, MOMENTS, dict(WHITEN=False, KEEP=False, HAS_W=False, BLOCK=16, ACC=tl.float32)),
    (kga._group_moments_kernel, MOMENTS, dict(WHITEN=True, KEEP=True, HAS_W=True, BLOCK=16, ACC=tl.float32)),
    (kga._group_adv_kernel, ADV, dict(MODE=0, SCALE=1, KEEP=True, BLOCK=1024, SBLOCK=1024, ACC=tl.float32)),
    (kga._group_adv_kernel, ADV, dict(MODE=2, SCALE=0, KEEP=False, BLOCK=1024, SBLOCK=64, ACC=tl.float32)),
]

if __name__ == "__main__":
    main(KERNELS)
