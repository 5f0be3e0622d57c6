"""Compile the rollout Triton kernels (paged-attention decode, KV store, block copy) to sm_90 PTX without a GPU,
at the engine's usual specialisations (block 16, GQA groups 1 and 4, head_dim 64 and 128, fp32/bf16; the bf16
paged-attention case with soft-capping and sinks)."""
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton.language as tl  # noqa: E402

from rlhf_fast.kernels import kv_cache as kc  # noqa: E402
from rlhf_fast.kernels import paged_attention as kpa  # noqa: E402
from _triton_ptx import main  # noqa: E402  (this script's own folder is on sys.path)


def _cases():
    for dt, h, kvh, d, opts in (("fp32", 8, 8, 64, False), ("bf16", 32, 8, 128, True)):  # bf16: softcap + sinks
        types = dict(out_ptr=f"*{dt}", q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", tables_ptr="*i32",
                     lens_ptr="*i32", sinks_ptr="*fp32", scale="fp32", max_blocks="i32", window="i32",
                     softcap="fp32")
        yield kpa._paged_attention_kernel, types, dict(H=h, KVH=kvh, D=d, BLOCK_SIZE=16, GROUP_P2=h // kvh,
                                                       D_P2=d, BS_P2=16, ACC=tl.float32, SOFTCAP=opts,
                                                       HAS_SINKS=opts)
        yield kc._store_kv_kernel, dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}", k_cache_ptr=f"*{dt}", v_cache_ptr=f"*{dt}",
                                        slot_ptr="*i64"), dict(ROW=kvh * d, ROW_P2=kvh * d)
        yield kc._copy_blocks_kernel, dict(cache_ptr=f"*{dt}", src_ptr="*i64", dst_ptr="*i64", planes_stride="i64"), \
            dict(BLOCK_NUMEL=16 * kvh * d, TILE=1024)


if __name__ == "__main__":
    main(_cases())
