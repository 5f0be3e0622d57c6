"""Benchmark GAE: the native scan against the reversed Python loop that TRL, verl and OpenRLHF run today.

CPU (default): batch 64 x T fp32 for T in (256, 2048, 8192) with holes in the mask: native C++ (`gae_cpu`) vs
the reference loop (`rlhf_fast.ops.reference.gae`, what those trainers do) vs our torch backend; time, GB/s
(reads r, V, mask and writes A, R: 17 bytes per fp32 token), peak extra memory, max |error| vs float64.
Issue target at 64 x 2048: native >= 100x faster than the loop, error <= 1e-5.
`--gpu` (needs CUDA): 4096 x 2048 = 8.4M tokens fp32: Triton scan, Triton scan + fused whitening (2 launches),
native CUDA scan, and the loop; GB/s and the fraction of the GPU's HBM bandwidth (issue target >= 65%).

Run (repo root): flock /tmp/rlhf_bench.lock python -m bench.bench_gae [--gpu] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import Case, device_name, run_case, write_results
from rlhf_fast.ops import gae, reference, use_backend

HBM_GB_S = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}  # spec sheet peaks
BYTES_PER_TOKEN_FP32 = 4 + 4 + 1 + 4 + 4  # r, V, mask in; A, R out


def _inputs(b, t, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    rewards = torch.randn(b, t, generator=g) * 0.05  # per-token KL penalty scale ...
    rewards[:, -1] += torch.randn(b, generator=g)  # ... plus a score at the end
    values = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.9  # holes, as from multi-turn observation tokens
    return rewards.to(device), values.to(device), mask.to(device)


def _cases(b, t, device, backends, *, loop=True, whiten=False):
    r, v, m = _inputs(b, t, device)
    kw = dict(gamma=1.0, lam=0.95)

    def ref():
        return reference.gae(r.double(), v.double(), m, **kw)

    params = dict(B=b, T=t, tokens=b * t, dtype="float32")
    nbytes = BYTES_PER_TOKEN_FP32 * b * t
    cases = []
    if loop:
        cases.append(Case("gae", dict(impl="python-loop", **params), lambda: reference.gae(r, v, m, **kw), ref=ref,
                          bytes_moved=nbytes))
    for name in backends:
        def run(name=name):
            with use_backend(name):
                return gae(r, v, m, **kw)

        cases.append(Case("gae", dict(impl=name, **params), run, ref=ref, bytes_moved=nbytes))
    if whiten:
        def run_w():
            with use_backend("triton"):
                return gae(r, v, m, whiten=True, **kw)

        def ref_w():
            a, ret = ref()
            return reference.masked_whiten(a, m), ret

        cases.append(Case("gae+whiten", dict(impl="triton-fused", **params), run_w, ref=ref_w,
                          bytes_moved=nbytes + 9 * b * t))  # second launch reads A, mask and writes A
    return cases


def _speedups(rows):
    loops = {(r["T"], r["case"]): r["time_ms"] for r in rows if r["impl"] == "python-loop"}
    for r in rows:
        base = loops.get((r["T"], r["case"]))
        if base:
            r["speedup_vs_loop"] = round(base / r["time_ms"], 1)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="run the CUDA benchmark (8.4M tokens)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: stable timings on a shared machine)")
    args = ap.parse_args()
    if not args.gpu:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        dev = torch.device("cuda")
        rows = [run_case(c, dev, repeats=20) for c in _cases(4096, 2048, dev, ["triton", "native"], whiten=True)]
        gpu = device_name(dev)
        peak = next((bw for key, bw in HBM_GB_S.items() if key in gpu), None)
        for r in rows:
            if peak and "GB_per_s" in r:
                r["hbm_fraction"] = round(r["GB_per_s"] / peak, 3)
        write_results("bench_gae_gpu", _speedups(rows), plot_x="impl", plot_y="GB_per_s")
    else:
        dev = torch.device("cpu")
        rows = []
        for t in (256, 2048, 8192):
            rows += [run_case(c, dev, repeats=10) for c in _cases(64, t, dev, ["native", "torch"])]
        write_results("bench_gae", _speedups(rows), plot_x="T", plot_y="time_ms", group_by="impl", logy=True)


if __name__ == "__main__":
    main()
