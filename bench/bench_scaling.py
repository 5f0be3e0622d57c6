"""Scale-out: the pipeline (SFT -> RM -> PPO) at world size 1 and 2 with `torchrun`, one thread per rank.

For each world size N it runs `torchrun --standalone --nproc_per_node N -m rlhf_fast pipeline` on the same config and
reports each stage's training time (from `report.json`), the peak resident memory of every rank, the parameter +
optimiser MiB each PPO rank holds (policy, value and AdamW state; FSDP2 shards them, so ~1/N), and the largest weight
difference of the final SFT and PPO models against N = 1. Target: training time at N = 2 at most 0.6x of N = 1.

    python -m bench.bench_scaling            # CPU, gloo, N = 1 and 2 (a reduced default task, a few minutes)
    python -m bench.bench_scaling --full     # the full default pipeline
    python -m bench.bench_scaling --quick    # a smoke run: a tiny pipeline (2 PPO iterations), results scaling_quick
    python -m bench.bench_scaling --gpu      # NCCL, N = 1 .. number of GPUs
    python -m bench.bench_scaling --hidden 512 --layers 4   # a wider model (results: scaling_h512_l4)
    python -m bench.bench_scaling --tp [--passes 2]         # tensor-parallel rows (results: scaling_tp, see tp_main)
    python -m bench.bench_scaling --tp --gpu [--gpus N]     # the same under NCCL, tp 2/4/8 (scaling_tp_gpu)

On the default model (hidden 128, 3 layers, ~0.6M parameters in its layers) a step is a few tens of milliseconds of
compute, so FSDP2's per-layer hooks and gloo collectives, and the per-rank fixed costs (imports, tokenizing the data,
loading models), weigh as much as the halved compute; `--hidden` / `--layers` show the scaling once compute dominates.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import device_name, write_results

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["task.n_sft=4096", "task.n_rm=1024", "task.n_ppo=512", "task.n_eval=64", "sft.epochs=1",
           "sft.eval_every=0", "sft.save_every=0", "rm.epochs=1", "rm.eval_every=0", "rm.save_every=0",
           "ppo.iterations=8", "ppo.save_every=0"]
QUICK = ["task.n_sft=256", "task.n_rm=64", "task.n_ppo=64", "task.n_eval=8", "ppo.iterations=2"]  # over REDUCED


def run_pipeline(n: int, out: Path, overrides: list[str], device: str) -> tuple[dict, float]:
    """One torchrun launch of the pipeline; (report.json, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sets = [a for o in overrides + [f"sft.device={device}", f"rm.device={device}", f"ppo.device={device}"]
            for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "rlhf_fast",
           "pipeline", *sets, "--out", str(out)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr[-4000:]}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - t


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


# --- tensor-parallel rows (`--tp`) --------------------------------------------------------------------------------

# An untied Llama (the benchmark's; hidden 256, 4 layers, 8 heads / 4 kv heads: tp 1, 2 and 4 divide them)
TP_ARCH = dict(vocab=4096, hidden=256, layers=4, heads=8, kv_heads=4, ffn=768, tied=False)
TINY_ARCH = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, tied=False)  # tests/_tp_worker.py's model
# GPU (`--gpu`): 8 kv heads so that tp 8 divides them
GPU_ARCH = dict(vocab=32768, hidden=1024, layers=8, heads=16, kv_heads=8, ffn=2816, tied=False)
CPU_LAYOUTS = ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4))  # (world size, tp): dp = world / tp
# `--moe`: a Qwen3-MoE (q/k norms, 4 experts of width 32, 2 active): tp splits whole experts over its ranks
TP_MOE_ARCH = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffn=0, tied=False, head_dim=16,
                   qk_norm=True, experts=4, top_k=2, moe_ffn=32)
MOE_LAYOUTS = ((1, 1), (2, 1), (2, 2), (4, 2))


def gpu_layouts(n: int) -> list[tuple[int, int]]:
    """(world, tp) for `n` GPUs: one GPU, then tp 2, 4, 8 alone on as many GPUs, then dp x tp 2 on all of them."""
    out = [(1, 1)] + [(t, t) for t in (2, 4, 8) if t <= n]
    if n >= 4 and n % 2 == 0:
        out.append((n, 2))
    return out


def llama_config(arch: dict):
    """A transformers config of a bench arch dict: a Llama, or (with `experts`) a Qwen3-MoE."""
    from transformers import LlamaConfig

    if arch.get("experts"):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(vocab_size=arch["vocab"], hidden_size=arch["hidden"], num_hidden_layers=arch["layers"],
                              num_attention_heads=arch["heads"], num_key_value_heads=arch["kv_heads"],
                              head_dim=arch["head_dim"], intermediate_size=arch["moe_ffn"],
                              moe_intermediate_size=arch["moe_ffn"], num_experts=arch["experts"],
                              num_experts_per_tok=arch["top_k"], tie_word_embeddings=arch["tied"],
                              max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaConfig(vocab_size=arch["vocab"], hidden_size=arch["hidden"], intermediate_size=arch["ffn"],
                       num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                       num_key_value_heads=arch["kv_heads"], max_position_embeddings=1024,
                       tie_word_embeddings=arch["tied"], pad_token_id=0, eos_token_id=1, bos_token_id=None)


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors`: the local shard of a DTensor (tp and/or FSDP), a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _sft_examples(arch: dict, n: int, length: int) -> list:
    """`n` SFT examples of `length` tokens (prompt a quarter), ids over the whole vocabulary, fixed seed."""
    from rlhf_fast.data import SFTExample

    g = torch.Generator().manual_seed(7)
    return [SFTExample(torch.randint(2, arch["vocab"], (length,), generator=g).tolist(), length // 4)
            for _ in range(n)]


def _kv_probe(model, device) -> dict:
    """The rollout engine's KV cache on this rank: bytes per token (all layers, K and V) and kv heads held, from
    a 2-prompt greedy generation; the reason where the engine does not run on this layout."""
    from rlhf_fast import parallelize as par
    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    try:
        with par.unsharded(model), torch.no_grad():
            eng = RolloutEngine(model, block_size=16, num_blocks=8, max_batch_tokens=64)
            eng.generate([[2, 3, 4, 5], [6, 7, 8]], SamplingParams(max_new_tokens=4, temperature=0.0, seed=0))
        kv = eng.kv_cache
        return {"kv_bytes_per_token": _local_bytes([kv]) // (eng.num_blocks * eng.block_size),
                "kv_heads_local": int(kv.shape[-2])}
    except Exception as e:  # noqa: BLE001 - a layout the engine refuses is a row with its reason
        return {"kv_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def tp_worker(out: Path, tp: int, arch: dict, device: str, steps: int, seqs: int, length: int) -> None:
    """One rank of a `--tp` launch: the benchmark model split over `tp` ranks and FSDP2-sharded over the dp ranks
    as the SFT stage prepares it, then SFT steps (fp32, AdamW) on a fixed global batch of `seqs` x `length`
    tokens. Writes `out/rank<r>.json`: this rank's parameter, gradient and AdamW bytes (moments, and the per-tensor
    step counters apart) read from the local shards of the actual tensors, the first step's global loss and
    gradient norm, the timed steps (ms), the KV cache bytes per token of the rollout engine on this layout, and the
    reward model's (a scalar-head model on the same backbone) parameter bytes."""
    from rlhf_fast import distributed as dist
    from rlhf_fast import parallelize as par
    from rlhf_fast.config import OptimConfig
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models import build_model
    from rlhf_fast.stages.common import make_optimizer
    from rlhf_fast.stages.sft import response_nll, trained_positions

    dist.init(timeout_s=600)
    torch.set_num_threads(1)
    dev = dist.device(device)
    cfg = llama_config(arch)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        model = build_model(cfg, device=dev)
        rm = ScalarHeadModel(build_model(cfg, lm_head=False, device=dev)).to(dev)  # (its head is made on the CPU)
    model = par.parallelize(model, tp=tp).train()
    params = [p for p in model.parameters() if p.requires_grad]
    row = {"rank": dist.rank(), "params_B": _local_bytes(params)}
    opt = make_optimizer(params, OptimConfig(lr=1e-3, weight_decay=0.0))
    data = _sft_examples(arch, seqs, length)
    count = sum(len(trained_positions(e)) for e in data)
    micro = max(1, seqs // max(1, dist.dp_size()) // 2)  # two micro-batches per rank

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step() -> tuple[float, float]:
        total = dist.accumulate(data, lambda items, real: response_nll(model, items)[0] / count, micro)
        if dist.world_size() == 1:  # float64 as dist.clip_grad_norm sums over ranks (torch's fp32 norm is off by
            # ~1e-4 relative on this model's 5M gradient elements on CPU: clip_grad_norm_ 0.65183 vs 0.65192)
            norm = float(sum(p.grad.detach().double().pow(2).sum() for p in params)) ** 0.5
        else:
            norm = dist.clip_grad_norm(params, float("inf"))
        return dist.all_sum(float(total)), norm

    row["loss"], row["grad_norm"] = step()
    row["grads_B"] = _local_bytes(p.grad for p in params if p.grad is not None)
    row["no_grad"] = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    opt.step()
    state = [st for st in opt.state.values()]
    row["optim_moments_B"] = _local_bytes(v for st in state for k, v in st.items() if k != "step")
    row["optim_step_B"] = _local_bytes(st["step"] for st in state if torch.is_tensor(st.get("step")))
    opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    row["step_ms"] = times
    if dev.type == "cuda":
        row["peak_alloc_B"] = torch.cuda.max_memory_allocated(dev)
    model.eval()
    row.update(_kv_probe(model, dev))
    rm = par.parallelize(rm, tp=tp)
    row["rm_params_B"] = _local_bytes(rm.parameters())
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(row))
    dist.barrier()


def _launch_tp(world: int, tp: int, out: Path, arch: dict, device: str, steps: int, seqs: int, length: int,
               timeout: float) -> list[dict]:
    """One `torchrun --nproc_per_node world` launch of `tp_worker`; every rank's row."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
           "bench.bench_scaling", "--tp-worker", str(out), "--tp-size", str(tp), "--arch", json.dumps(arch),
           "--device", device, "--steps", str(steps), "--seqs", str(seqs), "--length", str(length)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"world {world} tp {tp}: {' '.join(cmd)} failed (exit {p.returncode}):\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def tp_rows(layouts, arch: dict, device: str, *, steps: int, seqs: int, length: int, timeout: float = 900.0,
            tmp: Path | None = None, passes: int = 1) -> list[dict]:
    """One row per (world, tp) layout: per-rank bytes (max over ranks, and every rank's), their ratio to one
    process's, the SFT step time (the median over ranks of each rank's median step; with `passes` > 1 the layouts
    run in turn, pass after pass - A B C A B C - and the row keeps the best pass), the first step's loss and
    gradient norm against one process's (relative difference), the KV bytes per token per rank."""
    import statistics

    rows, base = [], None
    with tempfile.TemporaryDirectory() as t:
        root = tmp or Path(t)
        runs: dict[tuple[int, int], list[list[dict]]] = {}
        for i in range(passes):
            for world, tp in layouts:
                runs.setdefault((world, tp), []).append(
                    _launch_tp(world, tp, root / f"p{i}_w{world}_tp{tp}", arch, device, steps, seqs, length,
                               timeout))
        for world, tp in layouts:
            by_pass = runs[(world, tp)]
            ranks = min(by_pass, key=lambda rs: statistics.median(statistics.median(r["step_ms"]) for r in rs))
            keys = ("params_B", "grads_B", "optim_moments_B", "optim_step_B", "rm_params_B", "kv_bytes_per_token")
            if any([[r.get(k) for k in keys] for r in rs] != [[r.get(k) for k in keys] for r in ranks]
                   for rs in by_pass):
                raise RuntimeError(f"world {world} tp {tp}: the passes measured different per-rank bytes")
            r0 = ranks[0]
            per = {k: [r[k] for r in ranks] for k in ("params_B", "grads_B", "optim_moments_B", "optim_step_B",
                                                      "rm_params_B")}
            step_ms = statistics.median(statistics.median(r["step_ms"]) for r in ranks)
            row = {"case": f"dp{world // tp} x tp{tp}", "world_size": world, "tp": tp, "dp": world // tp,
                   "params_B_per_rank": max(per["params_B"]), "grads_B_per_rank": max(per["grads_B"]),
                   "optim_moments_B_per_rank": max(per["optim_moments_B"]),
                   "optim_step_B_per_rank": max(per["optim_step_B"]),
                   "rm_params_B_per_rank": max(per["rm_params_B"]),
                   "params_B_ranks": "/".join(map(str, per["params_B"])),
                   "rm_params_B_ranks": "/".join(map(str, per["rm_params_B"])),
                   "step_ms": round(step_ms, 1), "_step_ms": step_ms,
                   "step_ms_passes": "/".join(str(round(statistics.median(statistics.median(r["step_ms"])
                                                                          for r in rs), 1)) for rs in by_pass),
                   "loss": r0["loss"], "grad_norm": r0["grad_norm"]}
            if base is None and world == 1:
                base = row
            if base is not None:
                row["params_vs_1"] = round(row["params_B_per_rank"] / base["params_B_per_rank"], 4)
                row["step_vs_1"] = round(step_ms / base["_step_ms"], 3)
                row["loss_rel_diff_vs_1"] = abs(row["loss"] - base["loss"]) / abs(base["loss"])
                row["grad_norm_rel_diff_vs_1"] = abs(row["grad_norm"] - base["grad_norm"]) / base["grad_norm"]
            missing = sorted({f"rank {r['rank']}: {n}" for r in ranks for n in r.get("no_grad", [])})
            if missing:  # a parameter the step gave no gradient on some rank: reported, not hidden
                row["no_grad"] = "; ".join(missing)
            kv = [r.get("kv_bytes_per_token") for r in ranks]
            if all(k is not None for k in kv):
                row["kv_B_per_token_per_rank"] = max(kv)
                row["kv_heads_per_rank"] = r0["kv_heads_local"]
            else:
                row["kv_B_per_token_per_rank"] = ""
                row["kv_note"] = next(r["kv_error"] for r in ranks if "kv_error" in r)
            if "peak_alloc_B" in r0:
                row["peak_alloc_MiB_per_rank"] = round(max(r["peak_alloc_B"] for r in ranks) / 2**20, 1)
            row.update(arch={k: arch[k] for k in arch}, tokens_per_step=seqs * length)
            row["device"] = _tp_device(device, world)
            rows.append(row)
    for r in rows:
        r["arch"] = json.dumps(r["arch"], separators=(",", ":"))
        del r["_step_ms"]
    return rows


def _tp_device(device: str, world: int) -> str:
    if device == "cuda":
        return f"{world} x {device_name('cuda')} (NCCL)"
    return device_name("cpu").split(", torch threads")[0] + f"), {world} process(es) x 1 thread, gloo"


def tp_main(argv: list[str]) -> int:
    """`--tp`: the tensor-parallel rows. CPU (gloo): layouts dp1 x tp1, dp2 x tp1, dp1 x tp2, dp2 x tp2, dp1 x tp4
    of TP_ARCH; `--gpu` (NCCL): one GPU, tp 2/4/8 on as many GPUs, dp x tp 2 on all, of GPU_ARCH; `--tiny`:
    tests/_tp_worker.py's model (for the memory model's check), `--dry-run`: tiny, world 1 and 2 only."""
    ap = argparse.ArgumentParser(description="bench_scaling --tp: per-rank bytes and SFT step time under tp")
    ap.add_argument("--tp", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="CUDA + NCCL")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to use (0: all)")
    ap.add_argument("--tiny", action="store_true", help="tests/_tp_worker.py's tiny model")
    ap.add_argument("--moe", action="store_true", help="a small Qwen3-MoE (TP_MOE_ARCH; results scaling_tp_moe)")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, world 1 and 2 (tp 2), 1 timed step")
    ap.add_argument("--layouts", default="", help="world:tp,... (default: the device's)")
    ap.add_argument("--steps", type=int, default=3, help="timed SFT steps per launch")
    ap.add_argument("--passes", type=int, default=1, help="run the layouts in turn this many times; best pass")
    ap.add_argument("--name", default="", help="results name (default scaling_tp[_gpu][_tiny|_dryrun])")
    ap.add_argument("--tp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp-size", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--seqs", type=int, default=16, help="sequences per global batch")
    ap.add_argument("--length", type=int, default=64, help="tokens per sequence")
    args = ap.parse_args(argv)
    if args.tp_worker is not None:
        tp_worker(args.tp_worker, args.tp_size, json.loads(args.arch), args.device, args.steps, args.seqs,
                  args.length)
        return 0
    device = "cuda" if args.gpu else "cpu"
    small = args.tiny or args.dry_run
    arch = TP_MOE_ARCH if args.moe else TINY_ARCH if small else GPU_ARCH if args.gpu else TP_ARCH
    if args.layouts:
        layouts = [tuple(int(x) for x in item.split(":")) for item in args.layouts.split(",")]
    elif args.gpu:
        layouts = gpu_layouts(args.gpus or torch.cuda.device_count())
    elif args.dry_run:
        layouts = [(1, 1), (2, 2)]
    elif args.moe:
        layouts = list(MOE_LAYOUTS)
    else:
        layouts = list(CPU_LAYOUTS)
    if args.gpu and not small and args.seqs == 16 and args.length == 64:
        args.seqs, args.length = 32, 512  # enough compute per step for a GPU
    steps = 1 if args.dry_run else args.steps
    rows = tp_rows(layouts, arch, device, steps=steps, seqs=args.seqs, length=args.length,
                   passes=1 if args.dry_run else args.passes)
    name = args.name or ("scaling_tp" + ("_moe" if args.moe else "") + ("_gpu" if args.gpu else "") +
                         ("_dryrun" if args.dry_run else "_tiny" if args.tiny else ""))
    write_results(name, rows, plot_x="case", plot_y="step_ms", group_by="arch")
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--tp" in argv or "--tp-worker" in argv:
        return tp_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full default pipeline instead of the reduced one")
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny pipeline (the code path, not the numbers)")
    ap.add_argument("--gpu", action="store_true", help="CUDA + NCCL, N = 1 .. torch.cuda.device_count()")
    ap.add_argument("--hidden", type=int, default=0, help="model width (0: the default task's 128); heads of 32")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the default task's 3)")
    ap.add_argument("--tp", action="store_true", help="tensor-parallel rows instead (see tp_main)")
    args = ap.parse_args(argv)
    device = "cuda" if args.gpu else "cpu"
    sizes = list(range(1, torch.cuda.device_count() + 1)) if args.gpu else [1, 2]
    overrides = [] if args.full else REDUCED + (QUICK if args.quick else [])
    name = ("scaling_gpu" if args.gpu else "scaling") + ("_quick" if args.quick else "")
    if args.hidden:
        overrides += [f"sft.arch.hidden_size={args.hidden}", f"sft.arch.intermediate_size={3 * args.hidden}",
                      f"sft.arch.num_heads={args.hidden // 32}", f"sft.arch.num_kv_heads={max(1, args.hidden // 64)}"]
    if args.layers:
        overrides.append(f"sft.arch.num_layers={args.layers}")
    if args.hidden or args.layers:
        name += f"_h{args.hidden or 128}_l{args.layers or 3}"
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out = Path(tmp) / f"n{n}"
            report, wall = run_pipeline(n, out, overrides, device)
            times = report["stage_time_s"]
            train_s = times["sft"] + times["rm"] + times["ppo"]
            if n == 1:
                base = {"train": train_s, **times}
            dist = report.get("distributed", {})
            dist["state_mib"] = torch.load(out / "ppo" / "checkpoint" / "trainer_state.pt",
                                           weights_only=False).get("state_mib_per_rank", [])
            row = {"case": f"N={n}", "world_size": n, "wall_s": round(wall, 1), "train_s": round(train_s, 1),
                   "sft_s": round(times["sft"], 1), "rm_s": round(times["rm"], 1), "ppo_s": round(times["ppo"], 1),
                   "train_vs_n1": round(train_s / base["train"], 3),
                   "sft_vs_n1": round(times["sft"] / base["sft"], 3), "rm_vs_n1": round(times["rm"] / base["rm"], 3),
                   "ppo_vs_n1": round(times["ppo"] / base["ppo"], 3),
                   "peak_rss_mib_per_rank": "/".join(str(round(m)) for m in dist.get("peak_rss_mib", [])),
                   "state_mib_per_rank": "/".join(f"{m:.2f}" for m in dist.get("state_mib", [])),
                   "win_rate": report["win_rate"], "rm_accuracy": report["rm_accuracy"],
                   "device": device_name(device).split(", torch threads")[0] + f"), {n} process(es) x 1 thread"}
            if n > 1:
                one = Path(tmp) / "n1"
                row["max_weight_diff_sft"] = max_weight_diff(out / "sft" / "final", one / "sft" / "final")
                row["max_weight_diff_ppo"] = max_weight_diff(out / "ppo" / "final" / "policy",
                                                             one / "ppo" / "final" / "policy")
            rows.append(row)
    write_results(name, rows, plot_x="case", plot_y="train_s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
