"""What LoRA costs PPO's rollouts and update: the engine reading base + adapter unmerged vs a merged copy.

    flock /tmp/rlhf_bench.lock python -m bench.bench_lora [--quick] [--threads 1]

The route PPO takes: `models.lora.apply_lora` turns every targeted projection of rlhf_fast's own model into a
`LoRALinear`, which `rlhf_fast.models.layers.project` computes as W x + b + scale * B A x, so the engine and the
padding-free update read the live base and adapters, nothing is merged and no copy is held. The alternative would
merge once per iteration into a second set of weights for the engine. Rows (bench/results/lora.{csv,json,png}), on
bench_rollout's CPU Llama (hidden 256, 4 layers, vocab 16384) as rlhf_fast's own model (`harness.owned_model`),
r = 16 on all linears:
  * generate/base: the engine on the plain model (no adapters), the floor;
  * generate/lora-unmerged: the engine on base + adapters, our route; max |log-prob - fp64 peft forward| (the
    adapters exported in peft's format, `lora.save_adapter`, on transformers' model of the same base weights);
  * merge/copy: computing the merged weights once (`lora.merged_state_dict`), the other route's per-iteration cost,
    and generate/merged-copy: the engine on that copy (its extra memory is the copy's bytes, `copy_MiB`);
  * update/full and update/lora: one packed forward + backward of the policy loss's hidden states (all weights vs
    adapters only), with the trainable parameters and the bytes their AdamW state takes.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from bench.bench_rollout import MODELS, make_prompts, tiny_llama
from bench.harness import Case, device_name, owned_model, run_case, write_results
from rlhf_fast.config import LoRAConfig
from rlhf_fast.models.lora import apply_lora, merged_state_dict, save_adapter
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.rollout import RolloutEngine, SamplingParams


def _adapted(base, r: int):
    """`base` (deep-copied) with rank-r adapters on all linears whose B is random, so they change the outputs."""
    lm = copy.deepcopy(base)
    apply_lora(lm, LoRAConfig(r=r, alpha=2 * r), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return lm


def _fp64_logprobs(hf_base, lm, prompts, comps) -> list[torch.Tensor]:
    """The sampled tokens' log-probs by peft in float64: `lm`'s adapters saved in peft's format, loaded onto a copy
    of transformers model `hf_base` (the same base weights), one unpadded forward per completion."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as d:
        save_adapter(lm, d, base_dir=None)
        ref = PeftModel.from_pretrained(copy.deepcopy(hf_base), d).double().eval()
    out = []
    with torch.no_grad():
        for c in comps:
            p = prompts[c.prompt_index]
            logp = torch.log_softmax(ref(torch.tensor([p + list(c.token_ids)])).logits[0], -1)
            out.append(logp[len(p) - 1:-1].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0])
    return out


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 prompts x 8 new tokens, 1 repeat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, new = (4, 8) if args.quick else (16, 32)
    timing = dict(warmup=0 if args.quick else 1, repeats=1 if args.quick else 5)
    hf_base = tiny_llama(torch.device("cpu"))
    base = owned_model(hf_base)
    lm = _adapted(base, args.rank).eval()
    prompts = make_prompts(n, MODELS["cpu"]["vocab_size"])
    params = SamplingParams(max_new_tokens=new, seed=0)
    common = dict(prompts=n, new_tokens=new, r=args.rank, threads=args.threads)
    tokens = n * new

    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state_dict(lm, torch.float32))
    copy_mib = sum(p.numel() * p.element_size() for k, p in merged.named_parameters() if "proj" in k) / 2**20
    comps = RolloutEngine(lm).generate(prompts, params)
    cases = [
        Case("generate/base", common, lambda: RolloutEngine(base).generate(prompts, params)),
        Case("generate/lora-unmerged", common, lambda: RolloutEngine(lm).generate(prompts, params),
             ref=lambda: _fp64_logprobs(hf_base, lm, prompts, comps), out_of=lambda cs: [c.logprobs for c in cs]),
        Case("merge/copy", {**common, "copy_MiB": round(copy_mib, 2)},
             lambda: merged_state_dict(lm, torch.float32)),
        Case("generate/merged-copy", {**common, "copy_MiB": round(copy_mib, 2)},
             lambda: RolloutEngine(merged).generate(prompts, params)),
    ]
    batch = pack([prompts[c.prompt_index] for c in comps], [list(c.token_ids) for c in comps])

    def update(model):
        def run():
            model.zero_grad(set_to_none=True)
            (packed_hidden(model, batch) @ model.lm_head.weight.t()).logsumexp(-1).mean().backward()
        return run

    full = copy.deepcopy(base).train()
    for name, model in (("update/full", full), ("update/lora", lm.train())):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cases.append(Case(name, {**common, "trainable_params": trainable,
                                 "adam_state_MiB": round(2 * 4 * trainable / 2**20, 2)}, update(model)))
    rows = []
    for c in cases:
        row = run_case(c, "cpu", **timing)
        if c.name.startswith("generate/"):
            row["tokens_per_s"] = round(tokens / (row["time_ms"] * 1e-3), 1)
        rows.append(row)
    floor = rows[0]["time_ms"]
    for row in rows[1:4:2]:
        row["vs_base"] = round(row["time_ms"] / floor, 3)
    print(f"device: {device_name('cpu')}")
    write_results("lora_quick" if args.quick else "lora", rows, plot_x="case")


if __name__ == "__main__":
    main()
