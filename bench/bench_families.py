"""The rollout engine against Hugging Face `generate` on the families RL runs train today: a Qwen3 and a Qwen3-MoE of
about 10M parameters (issue 22).

    flock /tmp/rlhf_bench.lock python -m bench.bench_families [--quick | --gpu | --dry-run] [--threads N]

Rows (bench/results/families.{csv,json,png}), per family: `generate/hf` and `generate/engine` (rlhf_fast's own model
holding the same weights, `bench.harness.owned_model`): 16 prompts of 8..48 tokens, 64 new tokens, sampling at
temperature 1; tokens/s, the speed-up over HF and the peak extra memory of one call (CPU: resident set; CUDA: the
allocator's peak, KV pool included for the engine since it is made inside the call); and `greedy/engine-vs-hf`: how
many greedy completions equal HF's. CPU timings use 1 torch thread by default. `--gpu`: the same on CUDA in bf16
(bench/results/families_gpu.*, the `perf/families` row of `bench.gpu_check`); `--dry-run`: that code path on CPU
with a 2-layer model, 2 prompts x 4 tokens (families_gpu_dryrun.*, what `bench.gpu_check --dry-run` runs).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from bench.bench_rollout import hf_generate
from bench.harness import device_name, owned_model, peak_extra_memory, write_results
from rlhf_fast.rollout import RolloutEngine, SamplingParams

SIZES = {  # ~10M parameters each at vocab 8192 (embeddings tied)
    "bench": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=8192, max_position_embeddings=512,
                  tie_word_embeddings=True),
    "dry-run": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128,
                    tie_word_embeddings=True),
}
MOE = {"bench": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=192, norm_topk_prob=True),
       "dry-run": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)}


def hf_model(family: str, size: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A randomly initialised transformers Qwen3 / Qwen3-MoE of `size` (seed 0), eval mode."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    cfg = Qwen3Config(**SIZES[size]) if family == "qwen3" else Qwen3MoeConfig(**SIZES[size], **MOE[size])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device, dtype).eval()


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(8, 48))] for _ in range(n)]


def timed(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up, seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def family_rows(family: str, size: str, device: torch.device, n_prompts: int, new: int, repeats: int,
                dtype: torch.dtype = torch.float32) -> list[dict]:
    hf = hf_model(family, size, device, dtype)
    ours = owned_model(hf)
    prompts = prompts_for(n_prompts, hf.config.vocab_size)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    n_params = sum(p.numel() for p in ours.parameters())
    tokens = n_prompts * new
    with torch.no_grad():
        runs = {"generate/hf": lambda: hf_generate(hf, prompts, new, sample=True),
                "generate/engine": lambda: RolloutEngine(ours).generate(prompts, params)}
        secs = {k: timed(fn, repeats) for k, fn in runs.items()}
        peaks = {k: peak_extra_memory(fn, device) for k, fn in runs.items()}
        greedy = RolloutEngine(ours).generate(prompts, SamplingParams(max_new_tokens=new, temperature=0))
        equal = sum(o.token_ids == hf_generate(hf, [prompts[o.prompt_index]], new, sample=False)[0] for o in greedy)
    rows = [{"family": family, "case": k, "params_M": round(n_params / 1e6, 2), "prompts": n_prompts,
             "new_tokens": new, "tokens_per_s": round(tokens / secs[k], 1),
             "speedup_vs_hf": round(secs["generate/hf"] / secs[k], 2), "peak_extra_mem_MiB": round(peaks[k] / 2**20, 1),
             "device": device_name(device)} for k in runs]
    rows.append({"family": family, "case": "greedy/engine-vs-hf", "equal": equal, "of": len(greedy),
                 "device": device_name(device)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 prompts x 16 tokens, one timed repeat")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16")
    ap.add_argument("--dry-run", action="store_true", help="the --gpu code path on CPU: a 2-layer model, 2 x 4 tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--families", default="qwen3,qwen3_moe")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    size = "dry-run" if args.dry_run else "bench"
    n_prompts, new, repeats = (2, 4, 1) if args.dry_run else (4, 16, 1) if args.quick else (16, 64, 3)
    rows = [r for fam in args.families.split(",")
            for r in family_rows(fam, size, device, n_prompts, new, repeats, dtype)]
    name = ("families_gpu_dryrun" if args.dry_run else "families_gpu" if args.gpu
            else "families_quick" if args.quick else "families")
    write_results(name, rows, plot_x="family", plot_y="tokens_per_s")
    return 0


if __name__ == "__main__":
    main()
