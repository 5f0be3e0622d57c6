"""The reward model at world size 2 against 1: rounding amplified by training, or a real difference in the step?

The issue's pipeline (n_sft 8000, n_rm 1500, one epoch each) is built to its first RM step at N = 1 and at N = 2
(`torchrun --standalone --nproc_per_node N`, gloo, one thread per rank): two SFT models that differ by rounding, the
same tokenizer and data. Then:

1. The first RM step's gradient (`rm.step_loss`, the stage's own padding-free step on the model as `train_rm`
   prepares it, `stages.common.prepare`: FSDP2-sharded at N = 2; before any optimiser step) at N = 1 and 2 from
   the same SFT model, in float32 and float64: the largest difference relative to each tensor's largest gradient.
   Rounding is ~1e-7 in float32 and ~1e-15 in float64; a different normalisation, pair set or micro-batch
   assignment would be ~1e-1 in both.
2. Whole RM runs (`rm.train_rm`, one epoch): N = 2 against N = 1 from the same SFT model, in float32 and float64; a
   rounding-only control (N = 1 with `parallel.micro_batch_size=5`: the same gradients summed in another order);
   N = 1 from the N = 2 SFT model against N = 1 from the N = 1 one (the difference the RM inherits); and N = 2 from
   the N = 2 SFT against N = 1 from the N = 1 SFT (what a pipeline at N = 2 against N = 1 compares). Reported:
   the largest weight difference of the backbone (what `bench_scaling` reports), of the head's weight and of its
   bias, and of the per-step loss and gradient norm.

    python -m bench.bench_rm_ranks                  # builds both pipelines in a temporary directory (~8 min, 2 cores)
    python -m bench.bench_rm_ranks --from DIR       # DIR/n1, DIR/n2: pipeline directories (sft/final, data/)
    python -m bench.bench_rm_ranks --quick          # a smoke run: tiny pipelines (n_sft 256, n_rm 32), 2 RM steps

Results: `bench/results/rm_ranks.{csv,json}`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD = ["task.n_sft=8000", "task.n_rm=1500", "sft.epochs=1", "rm.epochs=1", "sft.eval_every=0", "sft.save_every=0",
         "rm.eval_every=0", "rm.save_every=0"]
QUICK = ["task.n_sft=256", "task.n_rm=32"]  # --quick: overrides BUILD's sizes (the code path, not the numbers)


# --- the worker (one torchrun launch) ----------------------------------------------------------------------------


def rm_config(src: Path, *, max_steps: int, micro_batch_size: int):
    from rlhf_fast.config import ParallelConfig, RMConfig

    return RMConfig(model=str(src / "sft" / "final"), train_data=str(src / "data" / "rm_train.jsonl"),
                    epochs=1, max_steps=max_steps, device="cpu",
                    parallel=ParallelConfig(micro_batch_size=micro_batch_size))


def float64_models():
    """`train_rm`'s model in float64 (the scores still leave the head as fp32, as the stage defines them)."""
    from unittest import mock

    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.stages import rm

    class Float64(ScalarHeadModel):
        @classmethod
        def from_pretrained(cls, *args, **kw):
            return ScalarHeadModel.from_pretrained(*args, **kw).double()

    return mock.patch.object(rm, "ScalarHeadModel", Float64)


def first_step_grads(cfg, float64: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, full gradients) of the first step of `train_rm(cfg)`: the same model (prepared as the stage does:
    `stages.common.prepare`, FSDP2 at world size > 1), batch and step code (`rm.step_loss`, which backpropagates)."""
    from torch.distributed.tensor import DTensor

    from rlhf_fast import distributed
    from rlhf_fast.data import epoch_batches, load_rm
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models import disable_dropout
    from rlhf_fast.models.loading import load_tokenizer
    from rlhf_fast.stages import rm
    from rlhf_fast.stages.common import prepare, resolve_device
    from rlhf_fast.truncation import context_length, fit_len

    tok = load_tokenizer(cfg.model)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = ScalarHeadModel.from_pretrained(cfg.model, new_head=True)
    model = model.double() if float64 else model
    if not cfg.dropout:
        disable_dropout(model)
    model = prepare(model, device=resolve_device(cfg.device), parallel_cfg=cfg.parallel,
                    gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision).train()
    train = load_rm(cfg.train_data, tok, fit_len(cfg.max_len, context_length(model.lm)), overlong=cfg.overlong)
    batch = epoch_batches([sum(len(c) for c in e.completions) for e in train], cfg.batch_size, seed=cfg.seed,
                          epoch=0)[0]
    loss, _ = rm.step_loss(model, [train[i] for i in batch], cfg)  # backpropagated inside (detached loss)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
             for n, p in model.named_parameters()}
    return distributed.all_sum(float(loss.detach())), grads


def worker(args) -> None:
    from rlhf_fast import distributed

    distributed.init(timeout_s=300)
    torch.set_num_threads(1)
    cfg = rm_config(Path(args.src), max_steps=args.max_steps, micro_batch_size=args.micro)
    out = Path(args.out)
    if args.worker == "grad":
        loss, grads = first_step_grads(cfg, args.float64)
        if distributed.is_main():
            torch.save({"loss": loss, "grads": grads}, out)
        return
    from rlhf_fast.stages.rm import train_rm

    if args.float64:
        with float64_models():
            train_rm(cfg, out, plots=False)
    else:
        train_rm(cfg, out, plots=False)


# --- the driver --------------------------------------------------------------------------------------------------


def torchrun(n: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "bench.bench_rm_ranks", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr[-4000:]}")


def build(src: Path, n: int, quick: bool = False) -> None:
    """The issue's pipeline at world size `n` up to its first RM step: SFT model, tokenizer and data under `src`
    (`quick`: tiny task sizes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sets = [a for o in BUILD + (QUICK if quick else []) for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
                    "rlhf_fast", "pipeline", *sets, "--out", str(src), "--stop-after", "rm:1"],
                   cwd=ROOT, env=env, check=True, capture_output=True)


def grad_diff(a: dict, b: dict, keys=None) -> float:
    """Largest |a - b| over the tensors `keys`, each relative to that tensor's largest |b|."""
    keys = keys or list(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in keys)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {f"lm.{k}": v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    if (model_dir / "scalar_head.safetensors").is_file():
        sd.update({f"head.{k}": v.double() for k, v in load_file(str(model_dir / "scalar_head.safetensors")).items()})
    return sd


def run_diff(a: Path, b: Path) -> dict:
    wa, wb = weights(a / "final"), weights(b / "final")
    lm = [k for k in wa if k.startswith("lm.")]
    la, lb = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b))
    loss = [abs(x["loss"] - y["loss"]) for x, y in zip(la, lb) if "loss" in x]
    gn = [abs(x["grad_norm"] - y["grad_norm"]) / y["grad_norm"] for x, y in zip(la, lb) if "grad_norm" in x]
    return {"steps": len(loss), "backbone_max_abs": max(float((wa[k] - wb[k]).abs().max()) for k in lm),
            "head_weight_max_abs": float((wa["head.weight"] - wb["head.weight"]).abs().max()),
            "head_bias_abs": float((wa["head.bias"] - wb["head.bias"]).abs().max()),
            "head_bias_of_ref": float(wb["head.bias"]), "loss_first_step_abs": loss[0], "loss_max_abs": max(loss),
            "grad_norm_first_step_rel": gn[0], "grad_norm_max_rel": max(gn)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", default="", help="a directory with n1/ and n2/, the pipeline at N = 1 and "
                    "2 (sft/final, data/); default: build them in a temporary directory")
    ap.add_argument("--max-steps", type=int, default=0, help="RM steps of the whole runs (0: one epoch)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny pipelines (n_sft 256, n_rm 32), whole RM "
                    "runs of 2 steps, results in rm_ranks_quick")
    ap.add_argument("--worker", choices=("grad", "train"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from bench.harness import device_name, write_results

    if args.quick:
        args.max_steps = args.max_steps or 2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(args.src) if args.src else tmp
        if not args.src:
            for n in (1, 2):
                build(src / f"n{n}", n, args.quick)
        sft = [weights(src / f"n{n}" / "sft" / "final") for n in (1, 2)]
        rows = [{"case": "SFT models: N=2 vs N=1", "backbone_max_abs": max(float((sft[1][k] - sft[0][k]).abs().max())
                                                                           for k in sft[0])}]
        for dtype in ("float32", "float64"):
            f64 = ["--float64"] if dtype == "float64" else []
            for n in (1, 2):
                torchrun(n, "--from", str(src / "n1"), "--worker", "grad", "--out", str(tmp / f"g{dtype}{n}.pt"), *f64)
            g1, g2 = (torch.load(tmp / f"g{dtype}{n}.pt") for n in (1, 2))
            rows.append({"case": f"first RM step's gradient, {dtype}: N=2 vs N=1, same SFT",
                         "loss_rel": abs(g2["loss"] - g1["loss"]) / abs(g1["loss"]),
                         "grad_max_rel": grad_diff(g2["grads"], g1["grads"],
                                                   [k for k in g1["grads"] if k != "head.bias"]),
                         "head_bias_grad_n1": float(g1["grads"]["head.bias"]),
                         "head_bias_grad_n2": float(g2["grads"]["head.bias"]),
                         "grad_abs_max": max(float(g.abs().max()) for g in g1["grads"].values())})
        runs = {"a": (1, "n1", [], 0), "b": (2, "n1", [], 0), "c": (1, "n1", [], 5), "d": (1, "n1", ["--float64"], 0),
                "e": (2, "n1", ["--float64"], 0), "f": (1, "n2", [], 0), "g": (2, "n2", [], 0)}
        for name, (n, sft_of, f64, micro) in runs.items():
            torchrun(n, "--from", str(src / sft_of), "--max-steps", str(args.max_steps), "--worker", "train",
                     "--out", str(tmp / name), *f64, "--micro", str(micro))
        for case, x, y in (("float32: N=2 vs N=1, same SFT", "b", "a"),
                           ("float32: N=1 micro-batches of 5 vs 1 (rounding only), same SFT", "c", "a"),
                           ("float64: N=2 vs N=1, same SFT", "e", "d"),
                           ("float32: N=1 from the N=2 SFT vs from the N=1 SFT", "f", "a"),
                           ("float32: N=2 from the N=2 SFT vs N=1 from the N=1 SFT (the pipeline)", "g", "a")):
            rows.append({"case": f"whole RM run, {case}", **run_diff(tmp / x, tmp / y)})
        for r in rows:
            r["device"] = device_name("cpu").split(", torch threads")[0] + "), 1 thread per rank"
        write_results("rm_ranks_quick" if args.quick else "rm_ranks", rows)

if __name__ == "__main__":
    main()
