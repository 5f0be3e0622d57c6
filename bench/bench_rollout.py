"""Rollout throughput and KV memory: RolloutEngine vs Hugging Face `generate` on a tiny (~11M-parameter) Llama.

    flock /tmp/rlhf_bench.lock python -m bench.bench_rollout [--quick | --gpu | --dry-run]

`--gpu`: the same rows on CUDA in bf16 with a ~155M-parameter Llama (hidden 1024, 8 layers, GQA 16/4, vocab 32000),
64 prompts x 128 new tokens, a 4 GiB KV pool per engine (bench/results/rollout_gpu.*). `--dry-run`: that code path
on CPU with a 2-layer hidden-64 Llama, 4 prompts x 8 new tokens (what `bench.gpu_check --dry-run` runs in CI).

Rows (bench/results/rollout.{csv,json,png}):
  * generate/hf, generate/engine, generate/engine-deterministic: 32 prompts of 8..64 tokens, 128 new tokens,
    sampling at temperature 1 with no top-k/top-p (PPO's setting: the log-probs are the policy's own); tokens/s,
    speed-up over HF, peak extra memory. CPU timings use 1 torch thread by default (see --threads), and are the best
    of `--rounds` interleaved rounds (each round runs every generate case once, in turn: the machine is shared);
    `cpu_ms` / `speedup_vs_hf_cpu_time`: the same rounds in process CPU time, which time slicing on a loaded machine
    does not inflate (with 1 thread the fairer figure there).
    `--vocab V`: the CPU model with another vocabulary (bench/results/rollout_v<V>.*).
  * generate/engine-compiled, generate/engine-deterministic-compiled: the same with `RolloutEngine(compile=True)`
    (the decode step compiled per batch bucket; CUDA graphs on CUDA), timed after a first request that compiles;
    `compile_s` and `compilations` are that first request's.
  * greedy/engine-vs-hf: how many of the 32 greedy completions equal HF's `generate(do_sample=False)` run per prompt.
  * logprobs/engine-vs-teacher-forced: max |engine log-prob - teacher-forced recompute|, default and deterministic.
  * kv/<prompts>/n=8 shared|unshared: peak KV bytes for 8 samples per prompt with and without prefix sharing (bench
    prompts with 128 new tokens; 300-token prompts with 32), and the measured waste (allocated minus held token slots)
    per sequence, which is at most block_size - 1.
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.harness import Case, _sync, device_name, run_case, write_results
from rlhf_fast.rollout import RolloutEngine, SamplingParams


MODELS = {
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=16384, max_position_embeddings=512),
    "gpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
    "dry-run": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}
KV_BYTES = {"gpu": 4 << 30}  # per engine on CUDA (the default, half the free memory, would not fit several engines)


def tiny_llama(device: torch.device, size: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODELS[size])).to(device, dtype).eval()


def make_prompts(n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(8, 64))] for _ in range(n)]


def hf_generate(model, prompts: list[list[int]], new: int, *, sample: bool) -> list[list[int]]:
    """Left-padded batched `generate`, exactly `new` tokens per prompt."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
    out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0, **kw)
    return out[:, width:].tolist()


def greedy_agreement(model, prompts, new, kv=None) -> tuple[int, int]:
    """(equal completions, completions differing only after an HF top-2 tie within 1e-6)."""
    outs = RolloutEngine(model, kv_cache_memory=kv).generate(prompts, SamplingParams(max_new_tokens=new, temperature=0))
    equal = ties = 0
    for o in outs:
        p = prompts[o.prompt_index]
        ref = hf_generate(model, [p], new, sample=False)[0]
        if o.token_ids == ref:
            equal += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
        with torch.no_grad():
            top2 = model(torch.tensor([p + ref[:i]], device=model.device)).logits[0, -1].topk(2).values
        ties += float(top2[0] - top2[1]) < 1e-6
    return equal, ties


def mismatch_rows(model, prompts, new, kv=None) -> list[dict]:
    """max |engine log-prob - teacher-forced recompute| over every sampled token, scored in reverse order."""
    rows = []
    for det in (False, True):
        eng = RolloutEngine(model, deterministic=det, kv_cache_memory=kv)
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=new, temperature=1.0, n=2, seed=1))
        ref = eng.teacher_forced_logprobs([prompts[o.prompt_index] for o in outs][::-1], outs[::-1])[::-1]
        diff = max(float((o.logprobs - r.cpu()).abs().max()) for o, r in zip(outs, ref))
        rows.append({"case": "logprobs/engine-vs-teacher-forced", "deterministic": det, "tokens": len(outs) * new,
                     "max_abs_diff": diff, "bitwise_equal": all(torch.equal(o.logprobs, r.cpu())
                                                                for o, r in zip(outs, ref)),
                     "device": device_name(model.device)})
    return rows


def kv_rows(model, prompts, new, block_size, label: str, kv=None) -> list[dict]:
    rows = []
    params8 = SamplingParams(max_new_tokens=new, temperature=1.0, n=8, seed=0)
    for name, ps, params in [(f"kv/{label}/n=8 shared", prompts, params8),
                             (f"kv/{label}/n=8 unshared", [p for p in prompts for _ in range(8)],
                              SamplingParams(max_new_tokens=new, temperature=1.0, n=1, seed=0))]:
        eng = RolloutEngine(model, block_size=block_size, kv_cache_memory=kv)
        eng.generate(ps, params)
        st = eng.stats
        seqs = len(ps) * params.n
        held = sum(len(p) + new - 1 for p in ps) * params.n  # K/V slots in use when every sequence is at its end
        rows.append({"case": name, "sequences": seqs, "block_size": block_size, "new_tokens": new,
                     "peak_kv_MiB": round(st.peak_kv_bytes / 2**20, 3), "peak_blocks": st.peak_blocks_used,
                     "token_slots_held_unshared": held,
                     "waste_tokens_per_seq": round((st.peak_blocks_used * block_size - held) / seqs, 2)
                     if name.endswith("unshared") else None,
                     "device": device_name(model.device)})
    return rows


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens (smoke run)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, a ~155M-parameter Llama")
    ap.add_argument("--dry-run", action="store_true", help="the --gpu code path on CPU with a tiny model")
    ap.add_argument("--vocab", type=int, default=None,
                    help="CPU model's vocabulary (default 16384; another size writes rollout_v<vocab>.*)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="CPU: timed rounds, each running every generate case once in turn (A B C A B C ...: the "
                         "machine is shared); each case's best round is reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared, oversubscribed machine OpenMP teams spin)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    size = "gpu" if args.gpu else "dry-run" if args.dry_run else "cpu"
    dev = torch.device("cuda" if args.gpu or (size == "cpu" and torch.cuda.is_available()) else "cpu")
    if args.vocab is not None:
        if size != "cpu":
            raise SystemExit("--vocab applies to the CPU model only")
        MODELS["cpu"] = dict(MODELS["cpu"], vocab_size=args.vocab)
    model = tiny_llama(dev, size, torch.bfloat16 if args.gpu else torch.float32)
    kv = KV_BYTES.get(size)
    n_prompts, new = {"gpu": (64, 128), "dry-run": (4, 8)}.get(size, (8, 32) if args.quick else (32, 128))
    prompts = make_prompts(n_prompts, model.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    sampling = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    engines = {"generate/engine": RolloutEngine(model, kv_cache_memory=kv),
               "generate/engine-deterministic": RolloutEngine(model, deterministic=True, kv_cache_memory=kv),
               "generate/engine-compiled": RolloutEngine(model, kv_cache_memory=kv, compile=True),
               "generate/engine-deterministic-compiled": RolloutEngine(model, deterministic=True,
                                                                       kv_cache_memory=kv, compile=True)}
    cases = [Case("generate/hf", {"prompts": n_prompts, "new_tokens": new, "params_M": round(n_params / 1e6, 2)},
                  lambda: hf_generate(model, prompts, new, sample=True))]
    for name, eng in engines.items():
        info = {"prompts": n_prompts, "new_tokens": new, "params_M": round(n_params / 1e6, 2)}
        if eng.decode_step.compiled:  # the first request compiles; the timed ones reuse its graphs
            eng.generate(prompts, sampling)
            info.update(compile_s=round(eng.stats.compile_seconds, 2), compilations=eng.stats.compilations)
        cases.append(Case(name, info, lambda eng=eng: eng.generate(prompts, sampling)))
    timing = dict(warmup=1, repeats=2) if args.gpu else dict(warmup=0, repeats=1, measure_memory=False)
    rows = []
    if size == "cpu":  # interleaved: every round times each case once, so load changes hit all cases alike
        for c in cases:
            rows.append(run_case(c, dev, warmup=1, repeats=1))  # memory, warm-up
        best, best_cpu = [float("inf")] * len(cases), [float("inf")] * len(cases)
        for _ in range(args.rounds):
            for i, c in enumerate(cases):
                t0, c0 = time.perf_counter(), time.process_time()
                c.fn()
                _sync(dev)
                best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
                best_cpu[i] = min(best_cpu[i], (time.process_time() - c0) * 1e3)
        for row, ms, cpu in zip(rows, best, best_cpu):
            row.update(time_ms=round(ms, 4), cpu_ms=round(cpu, 1), timing=f"best of {args.rounds} interleaved rounds")
    else:
        rows = [run_case(c, dev, **timing) for c in cases]
    for row in rows:
        row["tokens_per_s"] = round(n_prompts * new / (row["time_ms"] / 1e3), 1)
    hf_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_hf"] = round(r["tokens_per_s"] / hf_tps, 2)
        if "cpu_ms" in r:  # process CPU time: what time slicing on a loaded machine does not inflate (1 thread)
            r["speedup_vs_hf_cpu_time"] = round(rows[0]["cpu_ms"] / r["cpu_ms"], 2)
    greedy = prompts[:8] if args.gpu else prompts  # one HF generate per prompt
    equal, ties = greedy_agreement(model, greedy, new, kv)
    rows.append({"case": "greedy/engine-vs-hf", "prompts": len(greedy), "new_tokens": new, "equal": equal,
                 "differ_after_tie": ties, "differ_otherwise": len(greedy) - equal - ties,
                 "device": device_name(dev)})
    rows += mismatch_rows(model, prompts, new, kv)
    rows += kv_rows(model, prompts[: max(4, n_prompts // 4)], new, 16, "bench prompts", kv)
    rng = random.Random(1)
    long_prompts = [[rng.randrange(1, model.config.vocab_size) for _ in range(300)] for _ in range(4)]
    rows += kv_rows(model, long_prompts, 32 if size != "dry-run" else 4, 16, "300-token prompts", kv)
    name = {"gpu": "rollout_gpu", "dry-run": "rollout_gpu_dryrun"}.get(size, "rollout")
    if args.vocab is not None and args.vocab != 16384:
        name += f"_v{args.vocab}"

    write_results(name, rows, plot_x="case", plot_y="tokens_per_s")


if __name__ == "__main__":
    main()
