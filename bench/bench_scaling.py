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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full default pipeline instead of the reduced one")
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny pipeline (the code path, not the numbers)")
    ap.add_argument("--gpu", action="store_true", help="CUDA + NCCL, N = 1 .. torch.cuda.device_count()")
    ap.add_argument("--hidden", type=int, default=0, help="model width (0: the default task's 128); heads of 32")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the default task's 3)")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
