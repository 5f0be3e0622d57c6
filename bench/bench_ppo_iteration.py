"""One PPO iteration end to end on CPU, split by phase: rlhf_fast vs the same loop on PyTorch reference ops and
Hugging Face `generate`.

    flock /tmp/rlhf_bench.lock python -m bench.bench_ppo_iteration [--quick] [--hidden 256 --layers 4]

A Llama of the default pipeline's shape (randomly initialised; the default task's 40-word vocabulary), policy,
frozen reference, frozen reward model and value model; 32 prompts x 4 samples, up to 24 new tokens, 2 PPO epochs
of minibatch 64. Rows (bench/results/ppo_iteration[_h<hidden>_l<layers>].{csv,json,png}), one per (loop, phase), phase in generation |
scoring (policy/reference/value/reward passes) | advantages (token rewards + GAE + whitening) | update | total:
median ms over the measured iterations, generated tokens per iteration and tokens/s over the whole iteration.
  * rlhf_fast: the paged rollout engine, ops on their automatic backend (native C++ on CPU where built).
  * torch-ops+engine: the engine, every op forced to the PyTorch reference (`use_backend("torch")`).
  * torch-ops+hf-generate: the baseline loop: HF `generate` and the PyTorch reference ops.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import torch

from bench.harness import device_name, peak_extra_memory, write_results
from rlhf_fast import ops
from rlhf_fast.config import ModelArch, OptimConfig, PPOConfig, SamplingConfig, TaskConfig
from rlhf_fast.data import load_prompts
from rlhf_fast.default_task import build_model, build_tokenizer, write_task_data
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.stages.ppo import PPOTrainer

PHASES = {"generation": "time_generate", "scoring": "time_score", "advantages": "time_advantages",
          "update": "time_update"}
LOOPS = {"rlhf_fast": ("engine", None), "torch-ops+engine": ("engine", "torch"),
         "torch-ops+hf-generate": ("hf", "torch")}


def make_trainer(arch: ModelArch, tok, generator: str) -> PPOTrainer:
    cfg = PPOConfig(prompts_per_iter=32, sampling=SamplingConfig(n=4, max_new_tokens=24), ppo_epochs=2,
                    minibatch_size=64, generator=generator, optim=OptimConfig(lr=1e-5, schedule="constant"))
    policy = build_model(arch, tok, seed=0)
    ref = build_model(arch, tok, seed=0).requires_grad_(False)
    rm = ScalarHeadModel(build_model(arch, tok, seed=1)).requires_grad_(False)
    value = ScalarHeadModel(build_model(arch, tok, seed=1))
    return PPOTrainer(cfg, policy, value, ref, rm, tok)


def measure(loop: str, arch: ModelArch, tok, prompts: list[list[int]], iters: int) -> list[dict]:
    generator, backend = LOOPS[loop]
    ctx = ops.use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        trainer = make_trainer(arch, tok, generator)
        batches = [prompts[(i * 32) % len(prompts):][:32] for i in range(iters + 2)]
        trainer.iteration(batches[0], 0)  # warm-up
        peak = peak_extra_memory(lambda: trainer.iteration(batches[1], 1))
        runs = [trainer.iteration(batches[i + 2], i + 2) for i in range(iters)]
    rows = []
    tokens = statistics.median(r["generated_tokens"] for r in runs)
    total = statistics.median(sum(r[k] for k in PHASES.values()) for r in runs)
    for phase, key in {**PHASES, "total": None}.items():
        ms = 1e3 * (total if key is None else statistics.median(r[key] for r in runs))
        row = {"case": loop, "phase": phase, "time_ms": round(ms, 2), "generated_tokens": tokens,
               "tokens_per_s": round(tokens / total, 1) if key is None else "",
               "gen_tokens_per_s": round(tokens / statistics.median(r["time_generate"] for r in runs), 1)
               if phase == "generation" else "",
               "peak_extra_mem_MiB": round(peak / 2**20, 1) if key is None else "",
               "hidden": arch.hidden_size, "layers": arch.num_layers, "iterations": iters,
               "device": device_name("cpu")}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 measured iterations instead of 5")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ModelArch(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                     intermediate_size=2 * args.hidden)
    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(Path(d) / "tok")
        paths = write_task_data(Path(d) / "data", TaskConfig(n_sft=1, n_rm=1, n_ppo=256, n_eval=1))
        prompts = [p.ids for p in load_prompts(paths["ppo_prompts"], tok, 64)]
    rows = []
    for loop in LOOPS:
        rows += measure(loop, arch, tok, prompts, 2 if args.quick else 5)
    base = next(r["time_ms"] for r in rows if r["case"] == "torch-ops+hf-generate" and r["phase"] == "total")
    for r in rows:
        if r["phase"] == "total":
            r["speedup_vs_baseline"] = round(base / r["time_ms"], 2)
    name = "ppo_iteration" if (args.hidden, args.layers) == (128, 2) else f"ppo_iteration_h{args.hidden}_l{args.layers}"
    write_results(name, rows, plot_x="phase", plot_y="time_ms")


if __name__ == "__main__":
    main()
