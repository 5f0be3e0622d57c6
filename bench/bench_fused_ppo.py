"""Benchmark the fused PPO step against composing the separate ops and against the naive PyTorch path.

Forward + backward of  loss = ppo_clip(logp) + kl_coef * kl(logp, ref) - entropy_coef * H  from hidden states, at
N = batch * T = 4096 tokens (8 x 512, ~80% valid), H = 1024, V = 32768, fp32 on CPU:
  * fused:    `ppo_loss_from_hidden` (gradients computed in the forward pass, 6THV flops, one logits chunk)
  * composed: `linear_token_logprobs` + `ppo_policy_loss` + `kl_penalty` (8THV flops, one logits chunk)
  * naive:    logits -> log_softmax -> gather, then the same losses (6THV flops, several (N, V) fp32 tensors)
Reports time, TFLOP/s (of 6THV model flops over all N tokens) and its fraction of the device's peak, peak extra
memory and |loss error| vs float64 (on the first 2 sequences at GPU sizes, where a float64 copy would not fit).
`--gpu` runs bf16 on CUDA at 16k x 152k x 4096 (`--small` shrinks everything); `--dry-run` runs that code path on
CPU at tiny shapes (Triton under the interpreter).

Run (repo root): flock /tmp/rlhf_bench.lock python -m bench.bench_fused_ppo [--small] [--gpu | --dry-run]
"""
from __future__ import annotations

import argparse

import torch

from bench import roofline
from bench.harness import Case, max_abs_error, run_case, write_results
from rlhf_fast.ops import (KLTerm, PPOAgg, PPOClip, kl_penalty, linear_token_logprobs, ppo_loss_from_hidden,
                           ppo_policy_loss, reference, use_backend)

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


def _head(batch, rows):
    """The first `rows` sequences of a batch (the lm_head weight is shared)."""
    hidden, weight, *rest = batch
    return (hidden[:rows], weight, *(x[:rows] for x in rest))


def _fp64_loss(batch):
    hidden, weight, labels, old, adv, mask, ref_logp = batch
    with torch.no_grad():
        return _naive(hidden.double(), weight.double(), labels, old.double(), adv.double(), mask, ref_logp.double())


def _step(fn, batch, backend=None):
    def run():
        hidden, weight, *rest = batch
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        with use_backend(backend):
            loss = fn(h, w, *rest)
        loss.backward()
        return loss.detach(), h.grad, w.grad
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes for a quick run")
    ap.add_argument("--gpu", action="store_true", help="bf16 on CUDA")
    ap.add_argument("--dry-run", action="store_true", help="the --gpu code path on CPU at tiny shapes")
    args = ap.parse_args(argv)
    timing = dict(warmup=1, repeats=3)
    if args.gpu or args.dry_run:
        if args.gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        dev, dtype = torch.device("cuda" if args.gpu else "cpu"), torch.bfloat16
        b, t, width, vocab = (4, 256, 1024, 32768) if args.small else (16, 1024, 4096, 151936)
        if args.dry_run:
            b, t, width, vocab = 3, 8, 32, 300
            timing = dict(warmup=0, repeats=1, measure_memory=False)
        ref_rows = 2
        backend = "triton" if args.dry_run else None  # on CPU the automatic choice would be the native kernels
    else:
        backend = None
        dev, dtype = torch.device("cpu"), torch.float32
        b, t, width, vocab = (4, 64, 256, 8192) if args.small else (8, 512, 1024, 32768)
        ref_rows = b
    batch = _batch(b, t, width, vocab, dtype, dev)
    small = _head(batch, ref_rows)
    expected = _fp64_loss(small)
    params = dict(N=b * t, H=width, V=vocab, dtype=str(dtype).replace("torch.", ""), err_rows=ref_rows)
    flops = roofline.fused_ppo(b * t, width, vocab, batch[0].element_size()).flops
    rows = []
    for name, fn in (("naive", _naive), ("composed", _composed), ("fused", _fused)):
        case = Case("ppo_step/fwd+bwd", dict(path=name, **params), _step(fn, batch, backend), flops=flops)
        try:
            row = run_case(case, dev, **timing)
        except torch.cuda.OutOfMemoryError:  # the naive path's (N, V) fp32 tensors on a smaller GPU
            torch.cuda.empty_cache()
            rows.append({"case": case.name, **case.params, "error": "CUDA out of memory"})
            continue
        row["max_abs_err_vs_fp64"] = max_abs_error(_step(fn, small, backend)()[0], expected)
        rows.append(row)
    base = next((r for r in rows if r.get("path") == "naive" and "time_ms" in r), None)
    for r in rows:
        if base and "time_ms" in r:
            r["time_vs_naive"] = round(r["time_ms"] / base["time_ms"], 3)
            if base.get("peak_extra_mem_MiB", 0) > 0:
                r["mem_vs_naive"] = round(r["peak_extra_mem_MiB"] / base["peak_extra_mem_MiB"], 4)
    name = ("fused_ppo_gpu" if args.gpu or args.dry_run else "fused_ppo") + ("_small" if args.small else "")
    write_results(name + ("_dryrun" if args.dry_run else ""), rows, plot_x="path", plot_y="time_ms", group_by="case")


if __name__ == "__main__":
    main()
