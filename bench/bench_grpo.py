"""Benchmark the GRPO hot path against the way verl and TRL ship it.

(a) The GRPO loss step, forward + backward from the policy's last hidden states, at N = 4096 tokens (8 x 512, ~80%
    valid), H = 1024, V = 32768, fp32 on CPU; advantages (B,) from group_advantages broadcast over the tokens,
    clip-higher (0.2, 0.28), token-mean, no KL term (TRL's default beta = 0):
      * fused: `ops.ppo_loss_from_hidden` (gradients in the forward pass, one logits chunk at a time)
      * peer:  full logits = h @ W.T, log_softmax, gather at the sampled tokens, then the clipped surrogate with
               the token-mean over the mask (TRL `selective_log_softmax` + `_compute_loss` / verl
               `logprobs_from_logits` + `compute_policy_loss_vanilla`), written out below as they do.
    Time, TFLOP/s (6NHV model flops), peak extra memory, |loss error| vs float64.
(b) The advantage step at B = 8192 sequences, groups of 8 with shuffled ids: `ops.group_advantages` (native C++,
    torch) vs verl's per-row Python loop (`compute_grpo_outcome_advantage`: a dict of lists, torch.mean/std per
    group, a per-row assignment), written out below; max |error| vs the float64 loop.

Run (repo root): flock /tmp/rlhf_bench.lock python -m bench.bench_grpo [--small] [--part loss|advantages]
(both parts write bench/results/grpo.*; `--part advantages` alone, with more repeats, writes grpo_advantages.*).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from bench.harness import Case, run_case, write_results
from rlhf_fast.ops import PPOClip, expand_advantages, group_advantages, ppo_loss_from_hidden, use_backend

CLIP = PPOClip(0.2, 0.28)
GROUP = 8


def _batch(b, t, width, vocab, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, width, generator=g).to(dtype)
    weight = (torch.randn(vocab, width, generator=g) / width**0.5).to(dtype)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.8
    old = torch.randn(b, t, generator=g) * 0.1 - 10.4
    scores = (torch.rand(b, generator=g) < 0.5).float()  # verifiable 0/1 rewards
    adv = expand_advantages(group_advantages(scores, torch.arange(b) // 4).advantages, mask)  # (B, T)
    return hidden, weight, labels, old.to(dtype), adv.to(dtype), mask


def _peer_loss(hidden, weight, labels, old, adv, mask):
    """The peers' path: materialise the logits, log_softmax, gather, clipped surrogate, token-mean."""
    logits = hidden @ weight.t()  # (B, T, V)
    logp = torch.gather(logits.log_softmax(-1), -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - CLIP.low, 1 + CLIP.high)
    per_token = torch.maximum(loss1, loss2)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _step(loss_fn, hidden, weight, *rest):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(h, w, *rest)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _fused_loss(hidden, weight, labels, old, adv, mask):
    return ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, clip=CLIP)[0]


def loss_cases(small: bool) -> list[Case]:
    b, t, width, vocab = (4, 64, 256, 8192) if small else (8, 512, 1024, 32768)
    batch = _batch(b, t, width, vocab, torch.float32)
    hidden, weight, labels, old, adv, mask = batch

    def ref():
        with torch.no_grad():
            return _peer_loss(hidden.double(), weight.double(), labels, old.double(), adv.double(), mask)

    params = dict(N=b * t, H=width, V=vocab, dtype="float32")
    flops = 6.0 * b * t * width * vocab
    return [Case("grpo-loss/fwd+bwd", dict(impl="fused", **params), lambda: _step(_fused_loss, *batch), ref=ref,
                 out_of=lambda r: r[0], flops=flops),
            Case("grpo-loss/fwd+bwd", dict(impl="peer", **params), lambda: _step(_peer_loss, *batch), ref=ref,
                 out_of=lambda r: r[0], flops=flops)]


def verl_grpo_loop(scores: torch.Tensor, index, eps: float = 1e-6) -> torch.Tensor:
    """verl's per-row loop: group the scores in a dict of lists, mean/std per group, then one row at a time."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for k, xs in id2score.items():
        if len(xs) == 1:
            id2mean[k], id2std[k] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(xs)
            id2mean[k], id2std[k] = torch.mean(stacked), torch.std(stacked)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores


def advantage_cases(b: int) -> list[Case]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(b, generator=g) // GROUP  # groups of 8, rows shuffled (as after verl's balancing)
    scores = torch.rand(b, generator=g)
    index = ids.numpy()  # verl passes a numpy array of uids

    def ref():
        return verl_grpo_loop(scores.double(), index)

    params = dict(B=b, group=GROUP, dtype="float32")
    cases = [Case("group_advantages/grpo", dict(impl="verl-loop", **params), lambda: verl_grpo_loop(scores, index),
                  ref=ref, bytes_moved=b * 12)]
    for name in ("native", "torch"):
        def run(name=name):
            with use_backend(name):
                return group_advantages(scores, ids, "grpo", keep_singletons=True).advantages

        cases.append(Case("group_advantages/grpo", dict(impl=name, **params), run, ref=ref, bytes_moved=b * 12))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes for a quick run")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--part", choices=("all", "loss", "advantages"), default="all", help="run one part only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.part in ("all", "loss"):
        rows += [run_case(c, "cpu", warmup=1, repeats=3) for c in loss_cases(args.small)]
    if args.part in ("all", "advantages"):
        repeats = 5 if args.part == "all" else 21  # the shared machine is noisy: a longer median when alone
        rows += [run_case(c, "cpu", warmup=2, repeats=repeats)
                 for c in advantage_cases(1024 if args.small else 8192)]
    base = {r["case"]: r["time_ms"] for r in rows if r["impl"] in ("peer", "verl-loop")}
    for r in rows:
        r["speedup_vs_peer"] = round(base[r["case"]] / r["time_ms"], 2)
    name = "grpo" + ("" if args.part == "all" else f"_{args.part}") + ("_small" if args.small else "")
    write_results(name, rows, plot_x="impl", plot_y="time_ms", group_by="case", logy=True)


if __name__ == "__main__":
    main()
