"""Paged-attention decode: GB/s of K/V read, vs the PyTorch reference, max error vs float64.

    flock /tmp/rlhf_bench.lock python -m bench.bench_paged_attention [--quick]

CPU (always): native C++ (OpenMP over (row, kv head)) vs the reference, fp32, batch 32, GQA 8/2, head_dim 64,
block 16, context 128..2048. GPU (when CUDA exists): Triton and CUDA kernels, bf16, batch 32/64, context 2k/4k,
32 query / 8 kv heads, head_dim 128, block 16, with the fraction of the GPU's HBM bandwidth.
Results: bench/results/paged_attention.{csv,json,png}.
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import Case, device_name, run_case, write_results
from rlhf_fast import _native
from rlhf_fast.backend import triton_available, use_backend
from rlhf_fast.ops import paged_attention, reference

HBM_GB_S = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555}


def make(batch, heads, kv_heads, head_dim, ctx, block_size, dtype, device):
    g = torch.Generator().manual_seed(0)
    per_row = -(-ctx // block_size)
    nb = batch * per_row
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype).to(device)
    k = torch.randn(nb, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(nb, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    tables = torch.randperm(nb, generator=g).view(batch, per_row).to(torch.int32).to(device)  # scattered blocks
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return q, k, v, tables, lens


def cases_for(shape: dict, dtype, device, backends: list[str], with_ref: bool) -> list[Case]:
    q, k, v, tables, lens = make(**shape, dtype=dtype, device=device)
    elem = q.element_size()
    bytes_moved = 2 * shape["batch"] * shape["ctx"] * shape["kv_heads"] * shape["head_dim"] * elem + 2 * q.nbytes
    flops = 4 * shape["batch"] * shape["heads"] * shape["ctx"] * shape["head_dim"]
    scale = shape["head_dim"] ** -0.5

    def ref64():
        return reference.paged_attention(q.double(), k.double(), v.double(), tables, lens, scale)

    out = []
    for b in backends:
        def fn(b=b):
            with use_backend(b):
                return paged_attention(q, k, v, tables, lens)
        out.append(Case(f"{b}/{str(dtype).replace('torch.', '')}", dict(shape), fn, ref=ref64 if with_ref else None,
                        bytes_moved=bytes_moved, flops=flops))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    cpu_backends = ["torch"] + (["native"] if _native.has("paged_attention_cpu") else [])
    for ctx in ([128, 512] if args.quick else [128, 512, 2048]):
        shape = dict(batch=32, heads=8, kv_heads=2, head_dim=64, ctx=ctx, block_size=16)
        for c in cases_for(shape, torch.float32, "cpu", cpu_backends, with_ref=ctx <= 512):
            rows.append(run_case(c, "cpu", warmup=1, repeats=5))
    if torch.cuda.is_available():
        gpu_backends = (["triton"] if triton_available() else []) + \
            (["native"] if _native.has("paged_attention_cuda") else [])
        peak = next((v for k, v in HBM_GB_S.items() if k in device_name("cuda")), None)
        for batch in (32, 64):
            for ctx in (2048, 4096):
                shape = dict(batch=batch, heads=32, kv_heads=8, head_dim=128, ctx=ctx, block_size=16)
                for c in cases_for(shape, torch.bfloat16, "cuda", gpu_backends, with_ref=batch == 32 and ctx == 2048):
                    row = run_case(c, "cuda", warmup=5, repeats=20)
                    row["hbm_fraction"] = round(row["GB_per_s"] / peak, 3) if peak else None
                    rows.append(row)
    write_results("paged_attention", rows, plot_x="ctx", plot_y="GB_per_s")


if __name__ == "__main__":
    main()
