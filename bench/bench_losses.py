"""Benchmark the PPO policy and value losses, forward + backward, against a plain PyTorch composition.

The plain composition is what TRL / verl / OpenRLHF write inline: ratio, two surrogates, max, masked mean,
then the stats (clip fraction, approx KL, ratio mean/min/max) as separate masked reductions. Our op computes
loss and stats in one pass (Triton on GPU; on CPU the op runs its PyTorch composition, so expect parity there).
Reported: time, GB/s (inputs read twice, forward and backward, plus the gradient written), peak extra memory and
max |loss error| vs float64.
CPU (default): 64 x 2048 fp32. `--gpu`: 256 x 8192 (2M tokens) in fp32 and bf16, with the fraction of HBM.
`--dry-run`: the `--gpu` code path on CPU at 4 x 64 with the Triton kernels under the interpreter.

Run (repo root): flock /tmp/rlhf_bench.lock python -m bench.bench_losses [--gpu | --dry-run] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

from bench import roofline
from bench.harness import Case, run_case, write_results
from rlhf_fast.ops import ppo_policy_loss, reference, use_backend, value_loss


def naive_policy(logp, old, adv, mask, clip=0.2):
    m = mask.to(logp.dtype)
    n = m.sum()
    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = (torch.max(pg1, pg2) * m).sum() / n
    with torch.no_grad():
        stats = (((pg2 > pg1).to(m.dtype) * m).sum() / n, ((ratio - 1 - log_ratio) * m).sum() / n,
                 (ratio * m).sum() / n, ratio[mask].min(), ratio[mask].max())
    return loss, stats


def naive_value(v, v_old, ret, mask, clip=0.2):
    m = mask.to(v.dtype)
    n = m.sum()
    vc = v_old + torch.clamp(v - v_old, -clip, clip)
    l1, l2 = (v - ret) ** 2, (vc - ret) ** 2
    loss = 0.5 * (torch.max(l1, l2) * m).sum() / n
    with torch.no_grad():
        stats = (((l2 > l1).to(m.dtype) * m).sum() / n, 1 - torch.var((ret - v)[mask]) / torch.var(ret[mask]))
    return loss, stats


def _cases(b, t, dtype, device, backend=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (-3 * torch.rand(b, t, generator=g)).to(device, dtype)
    old = (x.float() + 0.3 * torch.randn(b, t, generator=g).to(device)).to(dtype)
    adv = torch.randn(b, t, generator=g).to(device, dtype)
    mask = (torch.rand(b, t, generator=g) < 0.9).to(device)
    nbytes = roofline.policy_loss(b * t, x.element_size()).bytes  # value_loss moves the same bytes
    params = dict(B=b, T=t, dtype=str(dtype).replace("torch.", ""))

    def fwd_bwd(fn):
        def run():
            y = x.detach().requires_grad_(True)
            with use_backend(backend):
                loss, _ = fn(y, old, adv, mask)
            loss.backward()
            return loss.detach()
        return run

    def ref_policy():
        return reference.ppo_policy_loss(x.double(), old.double(), adv.double(), mask)[0]

    def ref_value():
        return reference.value_loss(x.double(), old.double(), adv.double(), mask)[0]

    return [
        Case("policy/fwd+bwd", dict(impl="naive-torch", **params), fwd_bwd(naive_policy), ref=ref_policy,
             bytes_moved=nbytes),
        Case("policy/fwd+bwd", dict(impl="rlhf_fast", **params), fwd_bwd(ppo_policy_loss), ref=ref_policy,
             bytes_moved=nbytes),
        Case("value/fwd+bwd", dict(impl="naive-torch", **params), fwd_bwd(naive_value), ref=ref_value,
             bytes_moved=nbytes),
        Case("value/fwd+bwd", dict(impl="rlhf_fast", **params), fwd_bwd(value_loss), ref=ref_value,
             bytes_moved=nbytes),
    ]


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="run on CUDA at 256 x 8192")
    ap.add_argument("--dry-run", action="store_true", help="the --gpu code path on CPU at 4 x 64 (Triton interpreter)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1: shared box)")
    args = ap.parse_args(argv)
    timing = dict(repeats=10)
    if args.dry_run:
        dev = torch.device("cpu")
        cases = _cases(4, 64, torch.float32, dev, "triton") + _cases(4, 64, torch.bfloat16, dev, "triton")
        name, timing = "bench_losses_gpu_dryrun", dict(warmup=0, repeats=1, measure_memory=False)
    elif args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        dev = torch.device("cuda")
        cases = _cases(256, 8192, torch.float32, dev) + _cases(256, 8192, torch.bfloat16, dev)
        name = "bench_losses_gpu"
    else:
        torch.set_num_threads(args.threads)
        dev = torch.device("cpu")
        cases = _cases(64, 2048, torch.float32, dev)
        name = "bench_losses"
    rows = [run_case(c, dev, **timing) for c in cases]
    write_results(name, rows, plot_x="case", plot_y="time_ms", group_by="impl")


if __name__ == "__main__":
    main()
