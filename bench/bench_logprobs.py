"""Benchmark token_logprobs and linear_token_logprobs against the naive PyTorch path.

CPU (default): token_logprobs fwd and fwd+bwd at 4096 x 32768 (native vs torch reference, GB/s), and
linear_token_logprobs fwd+bwd at N=4096, H=1024, V=32768 fp32 (chunked native path vs naive logits -> log_softmax ->
gather): time, peak extra memory (also without the 144 MiB of hidden/weight gradients every path must return),
max |error| of logp vs float64. Targets: peak memory beyond the gradients <= 1/16 of naive's
(`mem_minus_grads_vs_naive` <= 0.0625), time <= 1.05x naive.
`--gpu`: token_logprobs at 8192 x 151936 bf16 (GB/s, fraction of HBM; target >= 85%) and the fused linear path at
N=16384, H=4096, V=151936 bf16 (TFLOP/s of 6NHV model flops; target fwd+bwd <= 110 ms), errors vs float64 on the
first 1024 rows. `--small` shrinks every size for a quick run; `--dry-run` runs the `--gpu` code path on CPU at tiny
shapes (Triton under the interpreter), as `python -m bench.gpu_check --dry-run` does in CI.
Every fused path also runs with a rollout's truncation (top_k=50, top_p=0.9: a selection pass per row, then the
truncated softmax) and with a final logit soft-cap (`--softcap`, default 30.0 as Gemma 2's final_logit_softcapping:
c tanh(x / c) inside the row kernels, its derivative in the backward; 0 skips those rows); `time_vs_full` is each
one's time over the same path's at top_k=0, top_p=1 without a cap.

Run (repo root): flock /tmp/rlhf_bench.lock python -m bench.bench_logprobs [--small] [--gpu | --dry-run] [--softcap C]
"""
from __future__ import annotations

import argparse
from functools import partial

import torch

from bench import roofline
from bench.harness import Case, run_case, write_results
from rlhf_fast.ops import linear_token_logprobs, reference, token_logprobs, use_backend


CUT = dict(top_k=50, top_p=0.9)  # a typical rollout truncation
FULL = dict(top_k=0, top_p=1.0)


def _variants(softcap: float) -> tuple[dict, ...]:
    """The op arguments each fused path runs with: the full softmax first (the base of `time_vs_full`), the
    truncation, and (softcap > 0) the full softmax of soft-capped logits."""
    return (FULL, CUT) + ((dict(FULL, softcap=softcap),) if softcap else ())


def _cut_name(cut: dict) -> str:
    name = "" if (cut["top_k"], cut["top_p"]) == (0, 1.0) else f" top_k={cut['top_k']} top_p={cut['top_p']}"
    return name + (f" softcap={cut['softcap']}" if cut.get("softcap") else "")


def _token_cases(n, vocab, dtype, device, backends, ref_rows=None, cuts=(FULL, CUT)):
    """`ref_rows`: compare only the first rows with float64 (a full float64 copy would not fit at GPU sizes)."""
    logits = torch.randn(n, vocab, device=device).mul_(3).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    grad = torch.randn(n, device=device)
    rows = n if ref_rows is None else min(n, ref_rows)
    elem = logits.element_size()

    def ref(cut):
        return reference.token_logprobs(logits[:rows].double(), labels[:rows], **cut)

    cases = []
    for b, cut in [(b, cut) for cut in cuts for b in backends]:
        def fwd(b=b, cut=cut):
            with use_backend(b), torch.no_grad():
                return token_logprobs(logits, labels, **cut)

        def fwd_bwd(b=b, cut=cut):
            x = logits.detach().requires_grad_(True)
            with use_backend(b):
                lp = token_logprobs(x, labels, **cut)
            lp.backward(grad)
            return lp.detach()

        params = dict(impl=f"{b} {str(dtype).replace('torch.', '')}{_cut_name(cut)}", backend=b, N=n, V=vocab,
                      dtype=str(dtype).replace("torch.", ""), **cut)
        head = lambda r: r[:rows]  # noqa: E731
        cases.append(Case("token_logprobs/fwd", params, fwd, ref=partial(ref, cut), out_of=head,
                          bytes_moved=roofline.token_logprobs(n, vocab, elem).bytes))
        # forward reads the logits once, backward reads them again and writes dlogits
        cases.append(Case("token_logprobs/fwd+bwd", params, fwd_bwd, ref=partial(ref, cut), out_of=head,
                          bytes_moved=roofline.token_logprobs(n, vocab, elem, backward=True).bytes))
    return cases


def _linear_cases(n, width, vocab, dtype, device, backends, ref_rows=None, cuts=(FULL, CUT)):
    hidden = torch.randn(n, width, device=device).to(dtype)
    weight = (torch.randn(vocab, width, device=device) / width**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    grad = torch.randn(n, device=device)
    # model flops of forward + backward (the chunked path recomputes the logits: 8NHV)
    flops = roofline.linear_logprobs(n, width, vocab, hidden.element_size()).flops
    rows = n if ref_rows is None else min(n, ref_rows)

    def ref(cut=FULL):
        with torch.no_grad():
            return reference.linear_token_logprobs(hidden[:rows].double(), weight.double(), labels[:rows], **cut)

    def run(fn):
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        lp = fn(h, w)
        lp.backward(grad)
        return lp.detach(), h.grad, w.grad

    def naive():
        return run(lambda h, w: reference.linear_token_logprobs(h, w, labels))

    params = dict(N=n, H=width, V=vocab, dtype=str(dtype).replace("torch.", ""))
    head = lambda r: r[0][:rows]  # noqa: E731
    cases = [Case("linear/fwd+bwd", dict(impl="naive", path="naive", **params, **FULL), naive, ref=ref,
                  out_of=head, flops=flops)]
    for b, cut in [(b, cut) for cut in cuts for b in backends]:
        def fused(b=b, cut=cut):
            with use_backend(b):
                return run(lambda h, w: linear_token_logprobs(h, w, labels, **cut))

        cases.append(Case("linear/fwd+bwd", dict(impl=f"chunked-{b}{_cut_name(cut)}", path=f"chunked-{b}", **params,
                                                 **cut), fused, ref=partial(ref, cut), out_of=head, flops=flops))
    grads_mib = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    return cases, grads_mib


def _vs_full(rows: list[dict]) -> None:
    """Each truncated (or soft-capped) row's time (and peak memory) over the same case and path at top_k=0, top_p=1
    without a cap."""
    full = {(r["case"], r["impl"]): r for r in rows
            if r.get("top_k") == 0 and r.get("top_p") == 1.0 and not r.get("softcap")}
    for r in rows:
        if "top_k" not in r:
            continue
        variant = {k: r[k] for k in ("top_k", "top_p", "softcap") if k in r}
        base = full.get((r["case"], r["impl"].replace(_cut_name(variant), "")))
        if base is None or r is base or "time_ms" not in r:
            continue
        r["time_vs_full"] = round(r["time_ms"] / base["time_ms"], 3)
        if r.get("peak_extra_mem_MiB") is not None and base.get("peak_extra_mem_MiB"):
            r["mem_vs_full"] = round(r["peak_extra_mem_MiB"] / base["peak_extra_mem_MiB"], 3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes for a quick run")
    ap.add_argument("--gpu", action="store_true", help="CUDA sizes (needs a GPU)")
    ap.add_argument("--dry-run", action="store_true", help="the --gpu code path on CPU at tiny shapes")
    ap.add_argument("--softcap", type=float, default=30.0,
                    help="final logit soft-cap of the extra rows (Gemma 2: 30.0); 0: no soft-capped rows")
    args = ap.parse_args(argv)
    cuts = _variants(args.softcap)
    rows = []
    if args.gpu or args.dry_run:
        if args.gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        dev = torch.device("cuda" if args.gpu else "cpu")
        if args.dry_run:
            n, v, nl, h = 16, 300, 16, 32
        else:
            n, v, nl, h = (1024, 32768, 1024, 1024) if args.small else (8192, 151936, 16384, 4096)
        token = _token_cases(n, v, torch.bfloat16, dev, ["triton", "torch"], ref_rows=1024, cuts=cuts)
        linear, grads_mib = _linear_cases(nl, h, v, torch.bfloat16, dev, ["triton"], ref_rows=1024, cuts=cuts)
    else:
        dev = torch.device("cpu")
        n, v, nl, h = (512, 8192, 512, 256) if args.small else (4096, 32768, 4096, 1024)
        token = _token_cases(n, v, torch.float32, dev, ["native", "torch"], cuts=cuts)
        token += _token_cases(n, v, torch.bfloat16, dev, ["native"], cuts=cuts)
        linear, grads_mib = _linear_cases(nl, h, v, torch.float32, dev, ["native"], cuts=cuts)
    # the interpreter is slow: one timed call and no memory pass in the dry run
    timing = dict(warmup=0, repeats=1, measure_memory=False) if args.dry_run else dict(warmup=1, repeats=3)
    for case in token:
        rows.append(run_case(case, dev, **timing))
    naive = None
    for case in linear:
        try:
            row = run_case(case, dev, **timing)
        except torch.cuda.OutOfMemoryError:  # the naive path's (N, V) fp32 tensors at GPU sizes on a smaller GPU
            torch.cuda.empty_cache()
            rows.append({"case": case.name, **case.params, "error": "CUDA out of memory"})
            continue
        if naive is None and case.params["path"] == "naive":
            naive = row
        if "peak_extra_mem_MiB" in row:
            row["peak_mem_minus_grads_MiB"] = round(row["peak_extra_mem_MiB"] - grads_mib, 2)
        if naive is not None:
            row["time_vs_naive"] = round(row["time_ms"] / naive["time_ms"], 3)
        if naive is not None and "peak_extra_mem_MiB" in row:
            for key in ("peak_extra_mem_MiB", "peak_mem_minus_grads_MiB"):  # RSS is meaningless at --small sizes
                ratio = row[key] / naive[key] if naive[key] > 0 else float("nan")
                row[key.replace("peak_", "").replace("_MiB", "") + "_vs_naive"] = round(ratio, 4)
        rows.append(row)
    _vs_full(rows)
    name = "logprobs_gpu" if args.gpu or args.dry_run else "logprobs"
    write_results(name + ("_small" if args.small else "") + ("_dryrun" if args.dry_run else ""), rows,
                  plot_x="case", plot_y="time_ms", group_by="impl", logy=True)


if __name__ == "__main__":
    main()
