"""Paged-attention decode: GB/s of K/V read, vs the PyTorch reference, max error vs float64.

    flock /tmp/rlhf_bench.lock python -m bench.bench_paged_attention [--quick | --gpu | --dry-run]

CPU (default): native C++ (OpenMP over (row, kv head)) vs the reference, fp32, batch 32, GQA 8/2, head_dim 64,
block 16, context 128..2048, plus a sliding window of 256 at context 2048 (`window` column; `time_vs_full` is its
time over the same backend's unwindowed row: the kernel reads the window's blocks only, so ~256 / 2048 of the K/V).
Results: bench/results/paged_attention.{csv,json,png}.
`--gpu`: Triton and CUDA kernels, bf16, batch 32/64, context 2k/4k, 32 query / 8 kv heads, head_dim 128, block 16,
with the fraction of the GPU's HBM bandwidth (bench/roofline.py `paged_decode`, over the keys actually read); the
batch 32 / context 2k rows are the headline (target >= 70% of HBM); batch 32 / context 4k with a window of 512 is
the windowed row (`time_vs_full`). Results: paged_attention_gpu.*. `--dry-run`: that code path on CPU at a tiny
shape (Triton under the interpreter, the native CPU kernel in place of the CUDA one).
"""
from __future__ import annotations

import argparse

import torch

from bench import roofline
from bench.harness import Case, run_case, write_results
from rlhf_fast import _native
from rlhf_fast.backend import triton_available, use_backend
from rlhf_fast.ops import paged_attention, reference


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


def cases_for(shape: dict, dtype, device, backends: list[str], with_ref: bool, window: int = 0) -> list[Case]:
    """One case per backend at `shape`; `window` > 0: a sliding window (the roofline counts the keys read)."""
    q, k, v, tables, lens = make(**shape, dtype=dtype, device=device)
    read = min(shape["ctx"], window) if window else shape["ctx"]
    roof = roofline.paged_decode(shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"], read,
                                 q.element_size())
    bytes_moved, flops = roof.bytes, roof.flops
    scale = shape["head_dim"] ** -0.5

    def ref64():
        return reference.paged_attention(q.double(), k.double(), v.double(), tables, lens, scale, window)

    out = []
    for b in backends:
        def fn(b=b):
            with use_backend(b):
                return paged_attention(q, k, v, tables, lens, sliding_window=window)
        name = f"{b}/{str(dtype).replace('torch.', '')}" + (f"/window{window}" if window else "")
        out.append(Case(name, dict(shape, window=window, dtype=str(dtype)[6:]),
                        fn, ref=ref64 if with_ref else None, bytes_moved=bytes_moved, flops=flops))
    return out


def add_time_vs_full(rows: list[dict]) -> None:
    """Each windowed row gets `time_vs_full`: its time over the same case's unwindowed row (same batch, context)."""
    for r in rows:
        if r.get("window"):
            base = r["case"].rsplit("/window", 1)[0]
            full = next((f for f in rows if not f.get("window") and f["case"] == base and f["ctx"] == r["ctx"]
                         and f["batch"] == r["batch"]), None)
            r["time_vs_full"] = round(r["time_ms"] / full["time_ms"], 4) if full else None


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the CUDA benchmark (bf16, batch 32/64, context 2k/4k)")
    ap.add_argument("--dry-run", action="store_true", help="the --gpu code path on CPU at a tiny shape")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the reference")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.gpu or args.dry_run:
        if args.gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        dev = "cuda" if args.gpu else "cpu"
        native = "paged_attention_cuda" if args.gpu else "paged_attention_cpu"
        backends = (["triton"] if triton_available() else []) + (["native"] if _native.has(native) else [])
        grid = [(b, c, 0) for b in (32, 64) for c in (2048, 4096)] + [(32, 4096, 512)] if args.gpu else \
            [(32, 2048, 0), (32, 2048, 8)]
        for batch, ctx, window in grid:
            shape = dict(batch=batch, heads=32, kv_heads=8, head_dim=128, ctx=ctx, block_size=16)
            if args.dry_run:
                shape = dict(batch=3, heads=4, kv_heads=2, head_dim=16, ctx=40, block_size=16)
            headline = (batch, ctx, window) == (32, 2048, 0)
            for c in cases_for(shape, torch.bfloat16, dev, backends, with_ref=headline or window > 0, window=window):
                timing = dict(warmup=5, repeats=20) if args.gpu else dict(warmup=0, repeats=1, measure_memory=False)
                row = run_case(c, dev, **timing)
                row["headline"] = headline
                rows.append(row)
        add_time_vs_full(rows)
        write_results("paged_attention_gpu" + ("_dryrun" if args.dry_run else ""), rows, plot_x="ctx",
                      plot_y="GB_per_s")
        return
    cpu_backends = ["torch"] + (["native"] if _native.has("paged_attention_cpu") else [])
    grid = [(128, 0), (512, 0), (512, 64)] if args.quick else [(128, 0), (512, 0), (2048, 0), (2048, 256)]
    for ctx, window in grid:
        shape = dict(batch=32, heads=8, kv_heads=2, head_dim=64, ctx=ctx, block_size=16)
        for c in cases_for(shape, torch.float32, "cpu", cpu_backends, with_ref=ctx <= 512 or window > 0,
                           window=window):
            rows.append(run_case(c, "cpu", warmup=1, repeats=5))
    add_time_vs_full(rows)
    write_results("paged_attention", rows, plot_x="ctx", plot_y="GB_per_s")


if __name__ == "__main__":
    main()
