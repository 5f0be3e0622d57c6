"""The multi-GPU step of `bench/gpu_check.py`: tensor parallelism under torchrun + NCCL (`--gpus N`, or every GPU
when there are several), checked against one GPU and bench/memory_model.py's per-rank bytes."""
from __future__ import annotations

import json

from bench.gpu_check_core import Check, Outcome, Target, _done

TP_LOSS_REL = 1e-5  # fp32: tp ranks reduce over their heads / columns, then all-reduce; the loss is a sum of logs
TP_NORM_REL = 1e-4  # the gradient norm over 8 layers of such reductions (CPU gloo measures ~2e-8 on the tiny model)


def multi_gpu_count(chk: Check) -> int:
    """GPUs the multi-GPU step uses: `--gpus`, else torch.cuda.device_count(); 2 in the dry run (CPU processes)."""
    if chk.dry_run:
        return 2
    import torch

    return chk.gpus or torch.cuda.device_count()


def step_multi_gpu_tp(chk: Check) -> Outcome:
    """`python -m bench.bench_scaling --tp --gpu --gpus N` (torchrun, NCCL): one GPU, tp 2/4/8 on as many GPUs and
    dp x tp 2 on all of them (the dry run: CPU gloo, the tiny model, one process and tp 2). Per layout: the first
    SFT step's loss and gradient norm against one GPU's (the tp tests' correctness check), per-rank parameter /
    gradient / AdamW / KV bytes against bench/memory_model.py's formula, the step time and the rollout engine's KV
    bytes per token per rank."""
    from bench import memory_model

    n = multi_gpu_count(chk)
    if n < 2:
        return Outcome("skipped", f"{n} GPU(s): the multi-GPU mode needs >= 2 (torch.cuda.device_count(), or "
                                  "--gpus N)")
    name = "scaling_tp_gpu" + ("_dryrun" if chk.dry_run else "")
    argv = ["--tp", "--name", name] + (["--dry-run"] if chk.dry_run else ["--gpu", "--gpus", str(n)])
    rc = chk.run_module("bench.bench_scaling", argv, "bench_scaling_tp.log", cap_s=300.0)
    path = chk.out / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    checks = {c["case"]: c for c in memory_model.check_measured([path], verbose=False)} if rows else {}
    targets = []
    for r in rows:
        if r["world_size"] > 1:
            loss, norm = r.get("loss_rel_diff_vs_1"), r.get("grad_norm_rel_diff_vs_1")
            targets.append(Target(f"{r['case']}: first SFT step loss, rel. diff vs 1 GPU", loss, f"<= {TP_LOSS_REL}",
                                  None if loss is None else loss <= TP_LOSS_REL))
            targets.append(Target(f"{r['case']}: gradient norm, rel. diff vs 1 GPU", norm, f"<= {TP_NORM_REL}",
                                  None if norm is None else norm <= TP_NORM_REL))
        c = checks.get(r["case"])
        targets.append(Target(f"{r['case']}: per-rank params {r['params_B_per_rank']} B, grads {r['grads_B_per_rank']}"
                              f", AdamW {r['optim_moments_B_per_rank']}, KV/token {r.get('kv_B_per_token_per_rank')}"
                              f" (x1 GPU {r.get('params_vs_1')}) = memory_model formula", "equal" if c and c["equal"]
                              else "DIFFERENT", "equal", bool(c and c["equal"])))
        peak = f"; peak {r['peak_alloc_MiB_per_rank']} MiB/rank" if r.get("peak_alloc_MiB_per_rank") else ""
        kv = f"; KV: {r['kv_note']}" if r.get("kv_note") else ""
        targets.append(Target(f"{r['case']}: SFT step ms (x1 GPU{peak}{kv})",
                              f"{r['step_ms']} ({r.get('step_vs_1')}x)"))
    if not rows:
        targets.append(Target("tp rows", None, "present", False))
    return _done(rc, "bench_scaling_tp.log", targets)
