"""The first-GPU check: build, correctness, headline benchmarks and one summary, in one go, under a time budget.

    python -m bench.gpu_check --out DIR [--budget-s 420]      # on a CUDA machine, from a fresh checkout
    python -m bench.gpu_check --out DIR --dry-run             # CPU, Triton interpreter, tiny shapes (CI runs this)
    python -m bench.gpu_check --out DIR --only multi_gpu/tp   # tensor parallelism on every GPU (`--gpus N`: N)

Steps, in priority order (a step the budget no longer allows is reported as skipped, never dropped):
  env          device, capability, versions, spec peaks (bench/roofline.py) and a measured memcpy bandwidth
  build        `rlhf_fast._C` for this device's own arch (RLHF_FAST_CUDA_ARCHS from the capability); build.log kept;
               `pip install -e .` first when this checkout is not the installed rlhf_fast
  correctness  `pytest -m gpu -x`: every Triton and CUDA C++ kernel vs float64, batch invariance, rollout log-probs
  perf/*       each benchmark's GPU mode at its headline shape, rows with time, GB/s or TFLOP/s, fraction of peak;
               perf/decode: decode tokens/s at batch 1, 32, 256 (eager, compiled + graphs, HF) vs a kernel-launch floor
               perf/trl_grpo: a GRPO step in TRL's train() with TRL's generate, ours, and vLLM colocate if installed
  multi_gpu/tp with several GPUs (all, or `--gpus N`; skipped on one): `bench_scaling --tp --gpu` under torchrun +
               NCCL at one GPU, tp 2/4/8 and dp x tp 2: each layout's first SFT step (loss, gradient norm) against
               one GPU's, per-rank parameter / gradient / AdamW / KV bytes against bench/memory_model.py's formula,
               step time. Last in priority: `--only multi_gpu/tp` runs it alone. The dry run runs it on CPU (gloo,
               the tiny model, one process and tp 2)
Everything lands in DIR: summary.md, summary.csv, summary.json, one log per step and the benchmarks' CSV/JSON/PNG.
On CUDA each step runs in its own process (a crash or hang costs that step only, killed at the budget); the dry
run runs them in this process (one interpreter start instead of nine on a 2-core CI machine) and skips only the
CUDA-only parts: the nvcc build and the PPO-iteration benchmark (no tiny mode; its CLI is checked instead).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.gpu_check_core import (ROOT, Check, Outcome, Step, Target, _bench, _done, _frac_target, _pick, _rows,
                                  _speed)
from bench.gpu_check_multi import multi_gpu_count, step_multi_gpu_tp

__all__ = ["Check", "Outcome", "Step", "Target", "STEPS", "main", "multi_gpu_count", "step_multi_gpu_tp"]
DEFAULT_BUDGET_S = 420.0  # 7 minutes: the check must fit an 8-minute GPU window with start-up to spare


# ---------------------------------------------------------------------------------------------------------------
# env and build
# ---------------------------------------------------------------------------------------------------------------

def cuda_archs(capability: tuple[int, int]) -> str:
    """RLHF_FAST_CUDA_ARCHS for a device of this compute capability: its own arch only ("90a" on Hopper, whose
    arch-specific features need the suffix; "80", "89", ... elsewhere)."""
    major, minor = capability
    return f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"


def step_env(chk: Check) -> Outcome:
    import torch

    from bench import roofline
    from bench.harness import device_name

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = device_name(dev)
    chk.info.update(device=name, torch=torch.__version__, python=platform.python_version())
    try:
        import triton

        chk.info["triton"] = triton.__version__
    except ImportError:
        chk.info["triton"] = "not installed"
    if dev == "cuda":
        cap = torch.cuda.get_device_capability()
        chk.info.update(capability=f"{cap[0]}.{cap[1]}", cuda=torch.version.cuda)
    peak = roofline.peak_for(name)
    chk.info["spec peak"] = (f"{peak.name}: HBM {peak.hbm_gbs:.0f} GB/s, bf16 {peak.bf16_tflops:.0f} / fp32 "
                             f"{peak.fp32_tflops:.1f} TFLOP/s dense" if peak else "not in bench/roofline.py")
    memcpy = roofline.memcpy_gbs(dev)
    chk.info["measured memcpy"] = f"{memcpy:.0f} GB/s" + (f" ({memcpy / peak.hbm_gbs:.0%} of spec HBM)" if peak else "")
    if dev != "cuda" and not chk.dry_run:
        return Outcome("failed", "no CUDA device (use --dry-run on CPU)")
    return Outcome("passed", targets=[Target("memcpy GB/s", memcpy, "", None)])


def _installed_here() -> bool:
    """Whether `import rlhf_fast.kernels` outside this checkout's root resolves to this checkout."""
    code = "import rlhf_fast, rlhf_fast.kernels; print(rlhf_fast.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(ROOT)


def build_commands(archs: str, installed: bool) -> tuple[list[list[str]], dict]:
    """The commands (and environment) that build `_C` for `archs` into this checkout, installing it if needed."""
    env = {"RLHF_FAST_CUDA": "1", "RLHF_FAST_CUDA_ARCHS": archs, "RLHF_FAST_REQUIRE_NATIVE": "1"}
    cmds = [[sys.executable, "setup.py", "build_ext", "--inplace", "-j", str(os.cpu_count() or 1)]]
    if not installed:  # offline machine: no build isolation, no dependency resolution
        cmds.append([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."])
    return cmds, env


def _probe_native() -> subprocess.CompletedProcess:
    """What a fresh process sees of `_C`: built with CUDA, and the two CUDA kernels."""
    code = ("from rlhf_fast import _native; print(_native.built_with_cuda(), _native.has('gae_cuda'), "
            "_native.has('paged_attention_cuda'))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def _native_probe_ok(probe: subprocess.CompletedProcess | None = None) -> bool:
    probe = probe or _probe_native()
    return probe.returncode == 0 and probe.stdout.split() == ["True", "True", "True"]


def step_build(chk: Check) -> Outcome:
    import torch

    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    archs = cuda_archs(cap)
    installed = _installed_here()
    cmds, env = build_commands(archs, installed)
    log = chk.out / "build.log"
    shown = "\n".join(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(c) for c in cmds)
    if chk.dry_run:
        log.write_text(f"dry run: would run (archs for capability {cap}):\n{shown}\n")
        return Outcome("skipped", f"dry run: nvcc build not run (archs {archs}, installed {installed}); see build.log",
                       [Target("RLHF_FAST_CUDA_ARCHS", archs)])
    failed = []
    with open(log, "w") as f:
        f.write(shown + "\n\n")
        for cmd in cmds:
            f.flush()
            # the install must happen even when the CUDA build failed: the Triton tests still run then
            run_env = {**os.environ, **(env if not failed else {"RLHF_FAST_CUDA": "auto"})}
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=run_env,
                                    timeout=max(1.0, min(240.0, chk.left()))).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed.append(f"{' '.join(cmd[1:4])}: exit {rc}")
    probe = _probe_native()
    ok = not failed and _native_probe_ok(probe)
    detail = f"archs {archs}; _C built_with_cuda, gae_cuda, paged_attention_cuda: {probe.stdout.strip()}"
    return Outcome("passed" if ok else "failed", "; ".join([detail, *failed, probe.stderr[-300:]]).strip("; ") +
                   "; see build.log", [Target("RLHF_FAST_CUDA_ARCHS", archs)])


# ---------------------------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------------------------

def junit_checks(xml: Path) -> list[Target]:
    """One row per test function (all its parametrisations) from pytest's junit XML: passed / failed / skipped."""
    per: dict[str, dict[str, int]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name', '').split('[', 1)[0]}"
        kind = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        per.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})[kind] += 1
    return [Target(f"{name}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped",
                   "FAILED" if c["failed"] else "passed" if c["passed"] else "skipped", "", False if c["failed"] else
                   (True if c["passed"] else None)) for name, c in per.items()]


def step_correctness(chk: Check) -> Outcome:
    xml = chk.out / "pytest_gpu.xml"
    argv = ["-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", "-rfEs", "--durations=15", f"--junitxml={xml}",
            *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu_*.py"))]
    env = {"RLHF_FAST_GPU_TESTS_ON_CPU": "1", "TRITON_INTERPRET": "1"} if chk.dry_run else {}
    rc = chk.run_module("pytest", argv, "pytest_gpu.log", cap_s=240.0, env=env)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    checks = []
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
        checks = junit_checks(xml)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = counts["failures"] + counts["errors"]
    targets = [Target("tests passed", passed), Target("tests failed", bad, "0", bad == 0),
               Target("tests skipped", counts["skipped"]), *checks]
    ok = rc == 0 and counts["tests"] > 0
    stop = " (-x: stopped at the first failure, later tests did not run)" if bad else ""
    return Outcome("passed" if ok else "failed", f"pytest exit {rc}{stop}; see pytest_gpu.log", targets)


# ---------------------------------------------------------------------------------------------------------------
# benchmarks: run one, then read its rows back from DIR/<name>.json
# ---------------------------------------------------------------------------------------------------------------

def step_logprobs(chk: Check) -> Outcome:
    rc = _bench(chk, "bench_logprobs", [], 150.0)
    rows = _rows(chk, "logprobs_gpu")
    tok = _pick(rows, case="token_logprobs/fwd", backend="triton")
    tok_bwd = _pick(rows, case="token_logprobs/fwd+bwd", backend="triton")
    lin = _pick(rows, case="linear/fwd+bwd", path="chunked-triton")
    shape = f"{tok['N']} x {tok['V']} {tok['dtype']}" if tok else "?"
    targets = [_frac_target(tok, f"token_logprobs fwd {shape}", "hbm_fraction", 0.85),
               _frac_target(tok_bwd, "token_logprobs fwd+bwd", "hbm_fraction", 0.85)]
    if lin:
        targets.append(Target(f"linear log-prob fwd+bwd {lin['N']} x {lin['V']} x {lin['H']}, ms "
                              f"({lin.get('TFLOP_per_s')} TFLOP/s, matmul_peak_fraction {lin.get('matmul_peak_fraction')})",
                              lin["time_ms"], "<= 110 ms", None if chk.dry_run else lin["time_ms"] <= 110.0))
    else:
        targets.append(Target("linear log-prob fwd+bwd ms", None, "<= 110 ms", False))
    return _done(rc, "bench_logprobs.log", targets)


def step_fused_ppo(chk: Check) -> Outcome:
    rc = _bench(chk, "bench_fused_ppo", [], 150.0)
    rows = _rows(chk, "fused_ppo_gpu")
    targets = []
    for path in ("fused", "composed", "naive"):
        r = _pick(rows, path=path)
        if r:
            targets.append(Target(f"PPO step {path} fwd+bwd {r['N']} x {r['V']} x {r['H']}, ms ({r.get('TFLOP_per_s')}"
                                  f" TFLOP/s, matmul_peak_fraction {r.get('matmul_peak_fraction')}, "
                                  f"peak extra {r.get('peak_extra_mem_MiB')} MiB)", r.get("time_ms", r.get("error"))))
    return _done(rc, "bench_fused_ppo.log", targets or [Target("PPO step rows", None, "present", False)])


def step_gae(chk: Check) -> Outcome:
    rc = _bench(chk, "bench_gae", [], 90.0)
    rows = _rows(chk, "bench_gae_gpu")
    fused = _pick(rows, case="gae+whiten", impl="triton-fused")
    targets = [_frac_target(fused, f"GAE + whitening {fused['tokens'] if fused else '?'} tokens", "hbm_fraction",
                            0.65)]
    launches = fused.get("triton_launches") if fused else None
    cuda = f" (all CUDA work: {fused.get('cuda_launches')}: {fused.get('cuda_launch_names')})" if fused and \
        fused.get("cuda_launches") else ""
    targets.append(Target(f"GAE + whitening Triton launches{cuda}", launches, "<= 2",
                          None if launches in (None, "") else int(launches) <= 2))
    for impl in ("triton", "native"):
        r = _pick(rows, case="gae", impl=impl)
        if r:
            targets.append(Target(f"GAE scan {impl}: {_speed(r)} (hbm_fraction)", r.get("hbm_fraction")))
    return _done(rc, "bench_gae.log", targets)


def step_paged(chk: Check) -> Outcome:
    rc = _bench(chk, "bench_paged_attention", [], 90.0)
    rows = _rows(chk, "paged_attention_gpu")
    targets = []
    for r in rows:
        if r.get("headline"):
            targets.append(_frac_target(r, f"paged decode {r['case']} batch {r['batch']} ctx {r['ctx']} GQA "
                                           f"{r['heads']}/{r['kv_heads']} block {r['block_size']}", "hbm_fraction",
                                        0.70))
        elif r.get("window"):  # the sliding-window row: reads only the window's blocks
            targets.append(Target(f"paged decode {r['case']} batch {r['batch']} ctx {r['ctx']}: {_speed(r)}; time "
                                  f"vs the same kernel without the window", r.get("time_vs_full"),
                                  f"~{r['window']}/{r['ctx']} of the K/V read"))
    return _done(rc, "bench_paged_attention.log", targets or [Target("paged decode headline rows", None, "present",
                                                                     False)])


def step_rollout(chk: Check) -> Outcome:
    rc = _bench(chk, "bench_rollout", [], 150.0)
    rows = _rows(chk, "rollout_gpu")
    targets = []
    for case in ("generate/hf", "generate/engine", "generate/engine-deterministic"):
        r = _pick(rows, case=case)
        if r:
            targets.append(Target(f"{case} tokens/s (x HF)", f"{r['tokens_per_s']} ({r['speedup_vs_hf']}x)"))
    for r in rows:
        if r.get("case") == "logprobs/engine-vs-teacher-forced":
            det = r["deterministic"]
            targets.append(Target(f"engine vs teacher-forced, max abs diff ({'deterministic' if det else 'default'})",
                                  r["max_abs_diff"], "bitwise" if det else "",
                                  bool(r["bitwise_equal"]) if det else None))
    return _done(rc, "bench_rollout.log", targets or [Target("rollout rows", None, "present", False)])


def step_families(chk: Check) -> Outcome:
    """Issue 22's families: the engine against HF generate on a Qwen3 and a Qwen3-MoE of ~10M parameters."""
    rc = _bench(chk, "bench_families", [], 120.0)
    rows = _rows(chk, "families_gpu")
    targets = []
    for r in rows:
        if r.get("case") == "generate/engine":
            targets.append(Target(f"{r['family']} engine tokens/s (x HF generate)",
                                  f"{r['tokens_per_s']} ({r['speedup_vs_hf']}x)"))
        elif r.get("case") == "greedy/engine-vs-hf":
            targets.append(Target(f"{r['family']} greedy completions equal to HF's", f"{r['equal']}/{r['of']}",
                                  "all (bf16: ties may differ)"))
    return _done(rc, "bench_families.log", targets or [Target("families rows", None, "present", False)])


DECODE_FLOOR_X = 1.5  # issue 24: decode at batch 1 within 1.5x of its kernel-launch floor


def step_decode(chk: Check) -> Outcome:
    """Issue 24: decode tokens/s at batch 1, 32, 256 (eager engine, compiled + CUDA graphs, HF generate) against the
    kernel-launch floor of one eager decode step (kernels x an empty kernel's launch time; ops counted on CPU)."""
    rc = _bench(chk, "bench_decode", [], 240.0)
    rows = _rows(chk, "decode_gpu")
    floor = _pick(rows, case="launch/floor")
    targets = []
    if floor:
        unit = "kernels" if floor.get("floor_ms") is not None else "aten ops (CPU: no floor time)"
        targets.append(Target(f"eager decode step at batch 1: {unit} x {floor['launch_us']} us empty launch "
                              f"(graph replay {floor.get('graph_launch_us')} us), floor ms",
                              floor.get("floor_ms") if floor.get("floor_ms") is not None else
                              f"{floor['kernels_per_step']} ops"))
    for r in rows:
        if str(r.get("case", "")).startswith("decode/"):
            targets.append(Target(f"decode {r['mode']} batch {r['batch']}: tokens/s (x HF, step ms, x floor)",
                                  f"{r['tokens_per_s']} ({r['speedup_vs_hf']}x, {r['step_ms']} ms, "
                                  f"{r.get('x_floor')})"))
    b1 = [r for r in rows if r.get("batch") == 1 and str(r.get("mode", "")).startswith("engine")
          and r.get("step_ms") is not None]
    if floor and b1:
        best = min(b1, key=lambda r: r["step_ms"])
        x = best.get("x_floor")
        targets.append(Target(f"decode at batch 1 ({best['mode']}, {best['step_ms']} ms/token) x its kernel-launch "
                              "floor", x if x is not None else "n/a (CPU: no launch floor)", f"<= {DECODE_FLOOR_X}",
                              None if chk.dry_run or x is None else x <= DECODE_FLOOR_X))
    else:
        targets.append(Target("decode at batch 1 x its kernel-launch floor", "rows missing", f"<= {DECODE_FLOOR_X}",
                              False))
    return _done(rc, "bench_decode.log", targets)


def ppo_iteration_argv(help_text: str) -> list[str]:
    """Arguments for bench/bench_ppo_iteration.py (issue 10's, changing): its `--gpu` mode at its default
    (headline) size with one measured iteration where it has them, else its quick CPU run."""
    if "--gpu" not in help_text:
        return ["--quick"]
    return ["--gpu"] + (["--iters", "1"] if "--iters" in help_text else [])


def step_ppo_iteration(chk: Check) -> Outcome:
    """bench/bench_ppo_iteration.py through its CLI (read from its --help, so its interface may change)."""
    help_text = _cli_help("bench.bench_ppo_iteration")
    argv = ppo_iteration_argv(help_text)
    note = "" if "--gpu" in argv else " (it has no --gpu mode yet: this is its CPU benchmark)"
    if chk.dry_run:
        return Outcome("skipped", "dry run: no tiny mode fits CI (37 s on CPU at its smallest); the GPU run calls "
                                  f"`python -m bench.bench_ppo_iteration {' '.join(argv)}`{note}")
    before = set(chk.out.glob("ppo_iteration*.json"))
    rc = chk.run_module("bench.bench_ppo_iteration", argv, "bench_ppo_iteration.log", cap_s=180.0)
    targets = []
    for path in sorted(set(chk.out.glob("ppo_iteration*.json")) - before):
        for r in json.loads(path.read_text())["rows"]:
            if r.get("phase") == "total":
                secs = r["time_s"] if "time_s" in r else r.get("time_ms", 0) / 1e3
                speed = r.get("speedup", r.get("speedup_vs_baseline", ""))
                targets.append(Target(f"one PPO iteration, {r['case']}, s (speed-up vs the baseline loop: {speed})",
                                      secs))
    return Outcome("passed" if rc == 0 else "failed", f"exit {rc}; see bench_ppo_iteration.log{note}",
                   targets or [Target("PPO iteration rows", None, "present", False)])


def _cli_help(module: str) -> str:
    """`python -m module --help`, in this process (argparse reads sys.argv whether or not main takes argv)."""
    mod = importlib.import_module(module)
    buf, argv0 = io.StringIO(), sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(buf):
            mod.main()
    except SystemExit:
        pass
    finally:
        sys.argv = argv0
    return buf.getvalue()


def step_losses(chk: Check) -> Outcome:
    rc = _bench(chk, "bench_losses", [], 60.0)
    targets = [Target(f"{r['case']} {r['impl']} {r['dtype']}: {_speed(r)} (hbm_fraction)", r.get("hbm_fraction"))
               for r in _rows(chk, "bench_losses_gpu") if r.get("impl") == "rlhf_fast"]
    return _done(rc, "bench_losses.log", targets)


def step_trl_grpo(chk: Check) -> Outcome:
    """GRPO step inside TRL's `train()`: trl.GRPOTrainer (transformers' generate) vs ours (RolloutEngine + fused
    loss), and TRL with vLLM colocate where vllm is installed; skipped where TRL cannot be imported or installed."""
    rc = _bench(chk, "bench_trl_grpo", ["--repeats", "1"], 150.0)
    rows = _rows(chk, "trl_grpo_gpu")
    if not rows and "TRL unavailable" in (chk.out / "bench_trl_grpo.log").read_text(errors="replace"):
        return Outcome("skipped", "TRL is not installed and cannot be; see bench_trl_grpo.log")
    targets = [Target(f"GRPO step {r['side']} mu={r['num_iterations']} ({r['prompts']} x {r['generations']} x "
                      f"{r['new_tokens']}, {r['params_M']}M): s (generate s, x trl)",
                      f"{r['step_s']} ({r['generate_s']}, {r['speedup']}x)") for r in rows]
    ours = _pick(rows, side="rlhf_fast", num_iterations=1)
    if ours and not chk.dry_run:
        targets.append(Target("GRPO step speed-up over trl.GRPOTrainer", ours["speedup"], ">= 2",
                              ours["speedup"] >= 2.0))
    return _done(rc, "bench_trl_grpo.log", targets or [Target("GRPO step rows", None, "present", False)])


STEPS = [
    Step("env", "env", step_env, 0, 30),
    Step("build", "build", step_build, 30, 240),
    Step("correctness", "correctness", step_correctness, 30, 240),
    Step("perf/logprobs", "perf", step_logprobs, 20, 150),
    Step("perf/fused_ppo", "perf", step_fused_ppo, 20, 150),
    Step("perf/gae", "perf", step_gae, 10, 90),
    Step("perf/paged_attention", "perf", step_paged, 10, 90),
    Step("perf/rollout", "perf", step_rollout, 30, 150),
    Step("perf/families", "perf", step_families, 20, 120),
    Step("perf/decode", "perf", step_decode, 60, 240),
    Step("perf/ppo_iteration", "perf", step_ppo_iteration, 30, 180),
    Step("perf/losses", "perf", step_losses, 10, 60),
    Step("perf/trl_grpo", "perf", step_trl_grpo, 40, 150),
    Step("multi_gpu/tp", "multi_gpu", step_multi_gpu_tp, 60, 300),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory (created)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="global time budget in seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--only", default="", help="comma-separated step names to run (the others are skipped)")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs for the multi-GPU step (0: all; it runs when >= 2)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    steps = [s if not only or s.name in only or s.name == "env" else
             Step(s.name, s.kind, lambda _c: Outcome("skipped", "not in --only"), 0, 0) for s in STEPS]
    chk = Check(args.out.resolve(), args.budget_s, args.dry_run, args.gpus)
    rc = chk.run(steps)
    print((chk.out / "summary.md").read_text())
    print(f"[gpu_check] results in {chk.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
