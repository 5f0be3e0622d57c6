"""Rollout-vs-trainer ratio under top-k / top-p: how many sampled tokens have pi_train / pi_rollout outside
[0.9, 1.1] and [0.99, 1.01] when the trainer computes

  * full:      log-softmax over the whole vocabulary (what a trainer does that ignores the sampler's cut: the
               TRL #6789 / #7269 situation, there 51.8% outside [0.9, 1.1] at top-p 0.8);
  * recompute: the cut, renormalised distribution, its support recomputed from the trainer's logits
               (`ops.token_logprobs(..., top_k, top_p)`);
  * replay:    the same with the engine's recorded thresholds (`support="replay"`),

against the engine's `Completion.logprobs` (the sampled distribution's), in the default and the deterministic
mode. The trainer side is `teacher_forced_logprobs`-style: one packed forward over prompt + completion.

    python -m bench.bench_sampled_logprobs [--top-k 20] [--top-p 0.8] [--prompts 32] [--new 64] [--sharpen 30]

Writes bench/results/sampled_logprobs.{csv,json,png}.
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import device_name, write_results
from rlhf_fast import ops
from rlhf_fast.rollout import RolloutEngine, SamplingParams
from rlhf_fast.rollout.scoring import teacher_forced_logprobs


def policy(vocab: int, sharpen: float, seed: int = 0):
    """A random Llama (~6.6M parameters at vocab 4096) with its lm_head scaled by `sharpen`: a peaked next-token
    distribution like a trained policy's (its mean entropy is printed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def trainer_side(model, prompts, outs, temperature, top_k, top_p, support, deterministic):
    """The trainer's log-probs of the sampled tokens: a packed teacher-forced forward, the log-prob op on its
    logits with the given support (`full`: no cut)."""
    if support == "full":
        return teacher_forced_logprobs(model, prompts, outs, temperature=temperature, deterministic=deterministic)
    if support == "recompute":
        return teacher_forced_logprobs(model, prompts, outs, temperature=temperature, top_k=top_k, top_p=top_p,
                                       deterministic=deterministic)
    res = []  # replay: transformers' own forward, the engine's recorded thresholds
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            logits = model(torch.tensor([p + o.token_ids[:-1]])).logits[0, len(p) - 1:].float()
        res.append(ops.token_logprobs(logits, torch.tensor(o.token_ids), temperature=temperature, top_k=top_k,
                                      top_p=top_p, support="replay", support_threshold=o.support_threshold))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sharpen", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new = 8, 16
    model = policy(args.vocab, args.sharpen)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 96, (args.prompts,), generator=g)]
    params = SamplingParams(max_new_tokens=args.new, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=0)
    rows = []
    for det in (False, True):
        outs = RolloutEngine(model, deterministic=det).generate(prompts, params)
        ctx = [prompts[o.prompt_index] for o in outs]
        engine = torch.cat([o.logprobs for o in outs]).double()
        full_engine = RolloutEngine(model, deterministic=det).generate(
            prompts, SamplingParams(**{**params.__dict__, "logprobs": "full"}))
        entropy_proxy = -torch.cat([o.logprobs for o in full_engine]).double().mean()
        for support in ("full", "recompute", "replay"):
            if support == "replay" and det:
                continue  # the deterministic row of recompute is the exact one; replay reads HF's own forward
            trainer = torch.cat(trainer_side(model, ctx, outs, params.temperature, args.top_k, args.top_p, support,
                                             det)).double()
            d = trainer - engine
            ratio = d.exp()
            rows.append({"case": f"{support}{'/deterministic' if det else ''}", "support": support,
                         "deterministic": det, "top_k": args.top_k, "top_p": args.top_p, "tokens": int(d.numel()),
                         "outside_10pct": round(float(((ratio - 1).abs() > 0.1).double().mean()), 5),
                         "outside_1pct": round(float(((ratio - 1).abs() > 0.01).double().mean()), 5),
                         "max_abs_dlogp": float(d.abs().max()), "mean_nll_full": round(float(entropy_proxy), 4),
                         "device": device_name("cpu")})
    write_results("sampled_logprobs", rows, plot_x="case", plot_y="outside_10pct")


if __name__ == "__main__":
    main()
