"""Build the log-prob Triton kernels to sm_90 PTX without a GPU (run in a subprocess without TRITON_INTERPRET).

The interpreter accepts code that compiled Triton rejects, so each kernel is compiled once per representative
specialisation (the GPU tile sizes of the launchers); any compiler error fails the test that runs this script.
"""
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from rlhf_fast.kernels import linear_logprobs as kl  # noqa: E402
from rlhf_fast.kernels import logprobs as kr  # noqa: E402
from rlhf_fast.kernels import support as ks  # noqa: E402
from _triton_ptx import main  # noqa: E402  (this script's own folder is on sys.path)


def _cases():
    block_v = kr.block_v(151936, torch.device("cuda"))
    for dt in ("bf16", "fp32"):
        row = dict(logits_ptr=f"*{dt}", labels_ptr="*i64", thr_ptr="*fp32", V="i32", stride_row="i64",
                   inv_temp="fp32", ignore_index="i32", softcap="fp32")
        # the full softmax, the top-k / top-p support cut at a threshold per row, and that with the final soft-cap
        for has_thr, softcap in ((False, False), (True, False), (True, True)):
            consts = dict(HAS_THR=has_thr, SOFTCAP=softcap, BLOCK_V=block_v)
            yield kr._fwd_kernel, dict(row, logp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32"), consts
            yield kr._bwd_kernel, dict(row, lse_ptr="*fp32", ent_ptr="*fp32", dlogp_ptr="*fp32", dent_ptr="*fp32",
                                       out_ptr=f"*{dt}", stride_out="i64"), consts
        sel = dict(logits_ptr=f"*{dt}", thr_ptr="*fp32", V="i32", stride_row="i64", inv_temp="fp32", top_k="i32",
                   top_p="fp32", softcap="fp32")
        for use_k, use_p, softcap in ((True, False, False), (False, True, False), (True, True, False),
                                      (True, True, True)):
            yield ks._threshold_kernel, sel, dict(USE_K=use_k, USE_P=use_p, SOFTCAP=softcap, BLOCK_V=block_v)
        gpu = kl.tiles(torch.device("cuda"))
        lin = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", labels_ptr="*i64", M="i32", V="i32", H="i32",
                   stride_h="i64", stride_w="i64", inv_temp="fp32", softcap="fp32")
        for softcap in (False, True):
            tiles = dict(BLOCK_M=gpu["BLOCK_M"], BLOCK_V=gpu["BLOCK_V"], BLOCK_K=gpu["BLOCK_K"], HAS_BIAS=dt == "fp32",
                         IEEE=dt == "fp32", UPCAST=False, SOFTCAP=softcap)
            yield kl._fwd_kernel, dict(lin, part_ptr="*fp32", V_SPAN="i32"), tiles
            yield kl._dlogits_kernel, dict(lin, lse_ptr="*fp32", ent_ptr="*fp32", dlogp_ptr="*fp32", dent_ptr="*fp32",
                                           out_ptr=f"*{dt}", stride_o="i64"), tiles
    yield kl._merge_kernel, dict(part_ptr="*fp32", logp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", M="i32",
                                 SPLITS="i32"), dict(BLOCK_M=128)


if __name__ == "__main__":
    main(_cases())
