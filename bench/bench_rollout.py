"""Rollout throughput and KV memory: RolloutEngine vs Hugging Face `generate` on a tiny (~11M-parameter) Llama.

    flock /tmp/rlhf_bench.lock python -m bench.bench_rollout [--quick]

Rows (bench/results/rollout.{csv,json,png}):
  * generate/hf, generate/engine, generate/engine-deterministic: 32 prompts of 8..64 tokens, 128 new tokens,
    sampling at temperature 1 with no top-k/top-p (PPO's setting: the log-probs are the policy's own); tokens/s,
    speed-up over HF, peak extra memory. CPU timings use 1 torch thread by default (see --threads).
  * greedy/engine-vs-hf: how many of the 32 greedy completions equal HF's `generate(do_sample=False)` run per prompt.
  * logprobs/engine-vs-teacher-forced: max |engine log-prob - teacher-forced recompute|, default and deterministic.
  * kv/<prompts>/n=8 shared|unshared: peak KV bytes for 8 samples per prompt with and without prefix sharing (bench
    prompts with 128 new tokens; 300-token prompts with 32), and the measured waste (allocated minus held token slots)
    per sequence, which is at most block_size - 1.
"""
from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.harness import Case, device_name, run_case, write_results
from rlhf_fast.rollout import RolloutEngine, SamplingParams


def tiny_llama(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=16384, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(device).eval()


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


def greedy_agreement(model, prompts, new) -> tuple[int, int]:
    """(equal completions, completions differing only after an HF top-2 tie within 1e-6)."""
    outs = RolloutEngine(model).generate(prompts, SamplingParams(max_new_tokens=new, temperature=0))
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


def mismatch_rows(model, prompts, new) -> list[dict]:
    """max |engine log-prob - teacher-forced recompute| over every sampled token, scored in reverse order."""
    rows = []
    for det in (False, True):
        eng = RolloutEngine(model, deterministic=det)
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=new, temperature=1.0, n=2, seed=1))
        ref = eng.teacher_forced_logprobs([prompts[o.prompt_index] for o in outs][::-1], outs[::-1])[::-1]
        diff = max(float((o.logprobs - r.cpu()).abs().max()) for o, r in zip(outs, ref))
        rows.append({"case": "logprobs/engine-vs-teacher-forced", "deterministic": det, "tokens": len(outs) * new,
                     "max_abs_diff": diff, "bitwise_equal": all(torch.equal(o.logprobs, r.cpu())
                                                                for o, r in zip(outs, ref)),
                     "device": device_name(model.device)})
    return rows


def kv_rows(model, prompts, new, block_size, label: str) -> list[dict]:
    rows = []
    params8 = SamplingParams(max_new_tokens=new, temperature=1.0, n=8, seed=0)
    for name, ps, params in [(f"kv/{label}/n=8 shared", prompts, params8),
                             (f"kv/{label}/n=8 unshared", [p for p in prompts for _ in range(8)],
                              SamplingParams(max_new_tokens=new, temperature=1.0, n=1, seed=0))]:
        eng = RolloutEngine(model, block_size=block_size)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens (smoke run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared, oversubscribed machine OpenMP teams spin)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_llama(dev)
    n_prompts, new = (8, 32) if args.quick else (32, 128)
    prompts = make_prompts(n_prompts, model.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    sampling = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    engines = {"generate/engine": RolloutEngine(model),
               "generate/engine-deterministic": RolloutEngine(model, deterministic=True)}
    cases = [Case("generate/hf", {"prompts": n_prompts, "new_tokens": new, "params_M": round(n_params / 1e6, 2)},
                  lambda: hf_generate(model, prompts, new, sample=True))]
    for name, eng in engines.items():
        cases.append(Case(name, {"prompts": n_prompts, "new_tokens": new, "params_M": round(n_params / 1e6, 2)},
                          lambda eng=eng: eng.generate(prompts, sampling)))
    rows = []
    for c in cases:
        row = run_case(c, dev, warmup=1, repeats=3)
        row["tokens_per_s"] = round(n_prompts * new / (row["time_ms"] / 1e3), 1)
        rows.append(row)
    hf_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_hf"] = round(r["tokens_per_s"] / hf_tps, 2)
    equal, ties = greedy_agreement(model, prompts, new)
    rows.append({"case": "greedy/engine-vs-hf", "prompts": n_prompts, "new_tokens": new, "equal": equal,
                 "differ_after_tie": ties, "differ_otherwise": n_prompts - equal - ties, "device": device_name(dev)})
    rows += mismatch_rows(model, prompts, new)
    rows += kv_rows(model, prompts[: max(4, n_prompts // 4)], new, 16, "bench prompts")
    rng = random.Random(1)
    long_prompts = [[rng.randrange(1, model.config.vocab_size) for _ in range(300)] for _ in range(4)]
    rows += kv_rows(model, long_prompts, 32, 16, "300-token prompts")
    write_results("rollout", rows, plot_x="case", plot_y="tokens_per_s")


if __name__ == "__main__":
    main()
