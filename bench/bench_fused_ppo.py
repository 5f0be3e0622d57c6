"""Benchmark the fused PPO step against composing the separate ops and against the naive PyTorch path.

Forward + backward of  loss = ppo_clip(logp) + kl_coef * kl(logp, ref) - entropy_coef * H  from hidden states, at
N = batch * T = 4096 tokens (8 x 512, ~80% valid), H = 1024, V = 32768, fp32 on CPU:
  * fused:    `ppo_loss_from_hidden` (gradients computed in the forward pass, 6THV flops, one logits chunk)
  * composed: `linear_token_logprobs` + `ppo_policy_loss` + `kl_penalty` (8THV flops, one logits chunk)
  * naive:    logits -> log_softmax -> gather, then the same losses (6THV flops, several (N, V) fp32 tensors)
Reports time, TFLOP/s (of 6THV model flops over all N tokens), peak extra memory and |loss error| vs float64.
`--gpu` runs bf16 on CUDA at 16k x 152k x 4096 (`--small` shrinks everything).

Run (repo root): flock /tmp/rlhf_bench.lock python -m bench.bench_fused_ppo [--small] [--gpu]
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import Case, run_case, write_results
from rlhf_fast.ops import (KLTerm, PPOAgg, PPOClip, kl_penalty, linear_token_logprobs, ppo_loss_from_hidden,
                           ppo_policy_loss, reference)

KL_COEF, ENT_COEF, CLIP = 0.05, 0.01, PPOClip(0.2, 0.28)


def _batch(b, t, width, vocab, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(b, t, width, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, width, generator=g) / width**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (b, t), generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) < 0.8).to(device)
    old = (torch.randn(b, t, generator=g) * 0.1 - 10.4).to(device)
    adv = torch.randn(b, t, generator=g).to(device)
    ref_logp = (torch.randn(b, t, generator=g) * 0.1 - 10.4).to(device)
    return hidden, weight, labels, old, adv, mask, ref_logp


def _composed(h, w, labels, old, adv, mask, ref_logp):
    logp, ent = linear_token_logprobs(h, w, torch.where(mask, labels, -100), return_entropy=True)
    pg, _ = ppo_policy_loss(logp, old, adv, mask, clip=CLIP)
    kl = PPOAgg().aggregate(kl_penalty(logp, ref_logp, "k3"), mask)
    entropy = PPOAgg().aggregate(ent, mask)
    return pg + KL_COEF * kl - ENT_COEF * entropy


def _naive(h, w, labels, old, adv, mask, ref_logp):
    loss, _ = reference.ppo_loss_from_hidden(h, w, labels, old, adv, mask, kl=KLTerm(ref_logp, KL_COEF, "k3"),
                                             entropy_coef=ENT_COEF, clip=CLIP, agg=PPOAgg())
    return loss


def _fused(h, w, labels, old, adv, mask, ref_logp):
    loss, _ = ppo_loss_from_hidden(h, w, labels, old, adv, mask, kl=KLTerm(ref_logp, KL_COEF, "k3"),
                                   entropy_coef=ENT_COEF, clip=CLIP)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes for a quick run")
    ap.add_argument("--gpu", action="store_true", help="bf16 on CUDA")
    args = ap.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        dev, dtype = torch.device("cuda"), torch.bfloat16
        b, t, width, vocab = (4, 256, 1024, 32768) if args.small else (16, 1024, 4096, 151936)
    else:
        dev, dtype = torch.device("cpu"), torch.float32
        b, t, width, vocab = (4, 64, 256, 8192) if args.small else (8, 512, 1024, 32768)
    batch = _batch(b, t, width, vocab, dtype, dev)
    hidden, weight, *rest = batch

    def ref():
        with torch.no_grad():
            return _naive(hidden.double(), weight.double(), rest[0], *(x.double() for x in rest[1:3]), rest[3],
                          rest[4].double())

    expected = ref()
    params = dict(N=b * t, H=width, V=vocab, dtype=str(dtype).replace("torch.", ""))
    rows = []
    for name, fn in (("naive", _naive), ("composed", _composed), ("fused", _fused)):
        def step(fn=fn):
            h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            loss = fn(h, w, *rest)
            loss.backward()
            return loss.detach(), h.grad, w.grad

        case = Case("ppo_step/fwd+bwd", dict(path=name, **params), step, ref=lambda: expected,
                    out_of=lambda r: r[0], flops=6.0 * b * t * width * vocab)
        rows.append(run_case(case, dev, warmup=1, repeats=3))
    for r in rows:
        r["time_vs_naive"] = round(r["time_ms"] / rows[0]["time_ms"], 3)
        if rows[0]["peak_extra_mem_MiB"] > 0:
            r["mem_vs_naive"] = round(r["peak_extra_mem_MiB"] / rows[0]["peak_extra_mem_MiB"], 4)
    write_results(("fused_ppo_gpu" if args.gpu else "fused_ppo") + ("_small" if args.small else ""), rows,
                  plot_x="path", plot_y="time_ms", group_by="case")


if __name__ == "__main__":
    main()
