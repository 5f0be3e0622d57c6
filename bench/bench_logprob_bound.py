"""How close the rollout engine's log-probs are to the trainer's recompute on *trained* policies (issue 11).

A random model has flat next-token distributions; a trained one is sharp, so float32 rounding in the engine's
packed decode and in the trainer's forward differ more. This trains the default task's policy with SFT for
`--steps` steps, then samples `--prompts` x `n` completions at temperature 1 and reports, per checkpoint (random
init and after SFT), max and 99.9th-percentile |engine log-prob - recompute| over every sampled token for:
  * teacher-forced: `teacher_forced_logprobs` (the engine's own packed forward, default kernels);
  * deterministic: engine and scorer both `deterministic=True` (should be exactly 0);
  * trainer: `stages.packed_passes.policy_logprobs`, the packed training forward PPO uses for old_logp (on
    rlhf_fast's own model, as the stages train it);
  * padded-hf: the same model's weights in transformers' `LlamaForCausalLM` (exported and loaded back), a padded
    forward -> log_softmax -> gather: the recompute the common trainers (and rlhf_fast before issue 21) do.
Writes bench/results/logprob_bound.{csv,json}.

    python -m bench.bench_logprob_bound [--steps 300] [--prompts 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.harness import device_name, write_results
from rlhf_fast.config import OptimConfig, SFTConfig, TaskConfig
from rlhf_fast.data import load_prompts
from rlhf_fast.default_task import build_model, build_tokenizer, write_task_data
from rlhf_fast.models import load_model
from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs
from rlhf_fast.stages import experience as xp
from rlhf_fast.stages.packed_passes import policy_logprobs
from rlhf_fast.stages.sft import train_sft


def padded_hf_logprobs(model, ro: xp.Rollout) -> torch.Tensor:
    """log-probs (N, R) of `ro`'s labels by `model`'s weights in transformers' causal LM (exported, loaded back):
    one padded forward of the right-padded rows (causal: the padding after a row does not reach it), full logits
    -> log_softmax -> gather at the rows' positions."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=model.dtype).eval()
    logits = hf(input_ids=ro.input_ids, use_cache=False).logits.float()  # (N, T, V)
    logits = logits.gather(1, ro.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (N, R, V)
    return torch.log_softmax(logits, -1).gather(-1, ro.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def measure(model, prompts, tok, label: str, n: int, new: int) -> list[dict]:
    model.eval()
    params = SamplingParams(max_new_tokens=new, temperature=1.0, n=n, seed=0, stop_token_ids=(tok.eos_token_id,))
    rows = []
    for det in (False, True):
        eng = RolloutEngine(model, deterministic=det)
        outs = eng.generate(prompts, params)
        ctx = [prompts[o.prompt_index] for o in outs]
        sampled = torch.cat([o.logprobs for o in outs])
        with torch.no_grad():
            tf = torch.cat([t.cpu() for t in teacher_forced_logprobs(model, ctx, outs, deterministic=det)])
            ro = xp.make_rollout(prompts, outs, tok.pad_token_id)
            refs = {"teacher-forced": tf}
            if not det:  # the trainer's forwards are not the engine's deterministic one
                for name, logp in (("trainer", policy_logprobs(model, ro, 1.0)),
                                   ("padded-hf", padded_hf_logprobs(model, ro))):
                    refs[name] = torch.cat([logp[i, : len(o.token_ids)] for i, o in enumerate(outs)])
        for name, ref in refs.items():
            d = (sampled - ref).abs()
            rows.append({"case": f"{label}/{'deterministic' if det else name}", "tokens": d.numel(),
                         "max_abs_diff": float(d.max()), "p999_abs_diff": float(d.quantile(0.999)),
                         "mean_abs_logprob": float(sampled.abs().mean()), "device": device_name(model.device)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="SFT optimiser steps")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok = build_tokenizer(root / "tok")
        paths = write_task_data(root / "data", TaskConfig(n_sft=args.steps * 64, n_rm=8, n_ppo=args.prompts,
                                                          n_eval=8))
        prompts = [p.ids for p in load_prompts(paths["ppo_prompts"], tok, 64)][: args.prompts]
        cfg = SFTConfig(tokenizer=str(root / "tok"), train_data=paths["sft_train"], batch_size=64,
                        max_steps=args.steps, optim=OptimConfig(lr=2e-3, warmup_steps=30))
        rows = measure(build_model(cfg.arch, tok, seed=cfg.seed), prompts, tok, "random-init", 4, 24)
        res = train_sft(cfg, root / "sft", plots=False)
        rows += measure(load_model(res.model_dir, "sft model"), prompts, tok, f"sft-{args.steps}-steps", 4, 24)
    write_results("logprob_bound", rows)


if __name__ == "__main__":
    main()
