"""Decode tokens/s at batch 1, 32 and 256 (eager engine, compiled engine, HF generate) against a kernel-launch floor.

    flock /tmp/rlhf_bench.lock python -m bench.bench_decode --gpu        # CUDA, bf16, bench_rollout's ~155M Llama
    python -m bench.bench_decode --dry-run                               # CPU, tiny Llama, batches 1/2/4, 8 tokens

Issue 24, section 5: "on a GPU, decode at batch 1 within 1.5x of its kernel-launch floor".

Decode time is isolated from prefill by difference: each mode generates `new` tokens per prompt and then 1 token per
prompt (prefill + the first, sampled from the prefill's logits), and the per-token step time is
(t(new) - t(1)) / (new - 1); decode tokens/s = batch / step time. Both are the best of `repeats` timed calls after a
warm-up call (which compiles the compiled engine's buckets). The results are rewritten after every batch.

Rows (bench/results/decode_gpu.* with --gpu, decode_gpu_dryrun.* with --dry-run):
  * launch/floor: the kernel-launch floor of one eager decode step at batch 1. On CUDA: the kernels (every CUDA
    activity torch.profiler records: kernels, memcpys, memsets) one eager decode step launches, counted as the
    difference between a profiled 1 + k token and 1 token generate, divided by k; times the measured launch time of
    an empty kernel (1000 `x.add_(1)` on a 1-element tensor, synchronised once: `launch_us`). `graph_launch_us` is the
    same 1000 kernels replayed from one CUDA graph (what a graphed step pays per kernel), for information. On CPU
    (dry run): the aten ops one eager decode step dispatches (a TorchDispatchMode count) instead; no floor time.
  * decode/<mode>/batch=<B>: mode hf | engine | engine-compiled; step_ms (per-token step), tokens_per_s,
    speedup_vs_hf, and x_floor = step time / floor time (None without a floor); step_ms and tokens_per_s are None
    where t(new) <= t(1) (timer noise, only seen in the tiny dry run). engine-compiled rows carry
    compilations and compile_s (the warm-up call's).
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.bench_rollout import KV_BYTES, hf_generate, tiny_llama
from bench.harness import device_name, write_results
from rlhf_fast.rollout import RolloutEngine, SamplingParams

CONFIGS = {  # batches, new tokens, prompt length, timed repeats, decode steps profiled for the kernel count
    "gpu": dict(batches=(1, 32, 256), new=64, prompt_len=32, repeats=3, profiled=8),
    "dry-run": dict(batches=(1, 2, 4), new=8, prompt_len=8, repeats=2, profiled=2),
}
FLOOR_TARGET = 1.5  # decode at batch 1 within 1.5x of the kernel-launch floor


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def empty_launch_us(dev: torch.device, n: int = 1000) -> tuple[float, float]:
    """(eager, CUDA-graph replay) microseconds per launch of a kernel with no work: n `x.add_(1)` on one element."""
    x = torch.zeros(1, device=dev)
    for _ in range(50):
        x.add_(1)
    _sync(dev)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    eager = best / n * 1e6
    if dev.type != "cuda":
        return eager, float("nan")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(n):
            x.add_(1)
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return eager, best / n * 1e6


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _launches(fn, dev: torch.device) -> int:
    """CUDA activities (kernels, memcpy, memset) torch.profiler records during fn(); on CPU the aten ops dispatched."""
    if dev.type != "cuda":
        with _OpCount() as c:
            fn()
        return c.n
    from torch.profiler import ProfilerActivity, profile

    _sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(dev)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def kernels_per_step(model, prompt: list[int], k: int, kv) -> float:
    """Kernels (ops on CPU) one eager decode step at batch 1 launches: (profiled 1 + k tokens - 1 token) / k."""
    eng = RolloutEngine(model, kv_cache_memory=kv)
    dev = model.device
    run = lambda new: eng.generate([prompt], SamplingParams(max_new_tokens=new, temperature=1.0, seed=0))  # noqa: E731
    run(1 + k)  # warm-up: allocations, lazy inits
    return (_launches(lambda: run(1 + k), dev) - _launches(lambda: run(1), dev)) / k


def _best(fn, dev: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, bench_rollout's ~155M-parameter Llama")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny Llama, batches 1/2/4, 8 new tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    if not (args.gpu or args.dry_run):
        raise SystemExit("give --gpu or --dry-run")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    torch.set_num_threads(args.threads)
    size = "gpu" if args.gpu else "dry-run"
    cfg = CONFIGS[size]
    dev = torch.device("cuda" if args.gpu else "cpu")
    model = tiny_llama(dev, size, torch.bfloat16 if args.gpu else torch.float32)
    kv = KV_BYTES.get(size)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(1, vocab) for _ in range(cfg["prompt_len"])] for _ in range(max(cfg["batches"]))]
    new = cfg["new"]
    n_params = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    dtype = str(model.dtype).removeprefix("torch.")
    name = device_name(dev)

    with torch.no_grad():
        kernels = kernels_per_step(model, prompts[0], cfg["profiled"], kv)
    launch_us, graph_us = empty_launch_us(dev)
    floor_ms = kernels * launch_us / 1e3 if dev.type == "cuda" else None
    rows = [{"case": "launch/floor", "batch": 1, "counted": "cuda kernels" if floor_ms is not None else "aten ops",
             "kernels_per_step": round(kernels, 1), "launch_us": round(launch_us, 3),
             "graph_launch_us": None if graph_us != graph_us else round(graph_us, 3),
             "floor_ms": None if floor_ms is None else round(floor_ms, 4), "params_M": n_params, "dtype": dtype,
             "device": name}]

    out = "decode_gpu" if args.gpu else "decode_gpu_dryrun"
    engines = {"engine": RolloutEngine(model, kv_cache_memory=kv),
               "engine-compiled": RolloutEngine(model, kv_cache_memory=kv, compile=True)}
    for b in cfg["batches"]:
        ps = prompts[:b]
        runs = {"hf": lambda m, ps=ps: hf_generate(model, ps, m, sample=True)}
        for mode, eng in engines.items():
            runs[mode] = lambda m, eng=eng, ps=ps: eng.generate(ps, SamplingParams(max_new_tokens=m, temperature=1.0,
                                                                                    seed=0))
        hf_tps = None
        for mode, fn in runs.items():
            info = {}
            eng = engines.get(mode)
            with torch.no_grad():
                fn(new)  # warm-up (compiles the compiled engine's buckets for this batch)
                if eng is not None and eng.decode_step.compiled:
                    info = dict(compilations=eng.stats.compilations, compile_s=round(eng.stats.compile_seconds, 2))
                fn(1)
                t_new = _best(lambda: fn(new), dev, cfg["repeats"])
                t_one = _best(lambda: fn(1), dev, cfg["repeats"])
            # None where timer noise swamps the decode steps (t(new) <= t(1): a tiny dry run on a busy CPU)
            step_s = (t_new - t_one) / (new - 1) if t_new > t_one else None
            tps = b / step_s if step_s else None
            hf_tps = tps if mode == "hf" else hf_tps
            rows.append({"case": f"decode/{mode}/batch={b}", "mode": mode, "batch": b, "new_tokens": new,
                         "prompt_len": cfg["prompt_len"], "step_ms": round(step_s * 1e3, 4) if step_s else None,
                         "tokens_per_s": round(tps, 1) if tps else None,
                         "speedup_vs_hf": round(tps / hf_tps, 2) if tps and hf_tps else None,
                         "x_floor": None if floor_ms is None or not step_s else round(step_s * 1e3 / floor_ms, 3),
                         "params_M": n_params, "dtype": dtype, "device": name, **info})
        # after every batch: a run killed at gpu_check's cap (compiling batch 256) keeps the rows it has
        write_results(out, rows, plot_x="case", plot_y="tokens_per_s")


if __name__ == "__main__":
    main()
