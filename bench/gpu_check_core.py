"""The harness of `bench/gpu_check.py`: a step's targets and outcome, the run's state and budget (`Check`: each
step in its own process on CUDA, in this one in the dry run), the summary files, and the helpers the steps share to
run a benchmark and read its rows."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Target:
    """One row of the summary: what was measured, against what."""

    metric: str
    value: object = None
    target: str = ""
    met: bool | None = None  # None: no target, or not measurable here (e.g. no peak for this device)


@dataclasses.dataclass
class Outcome:
    status: str  # passed | failed | skipped
    detail: str = ""
    targets: list[Target] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    kind: str  # env | build | correctness | perf | multi_gpu
    fn: Callable[["Check"], Outcome]
    needs_s: float  # rough time it takes on an H100; not started with less left
    cap_s: float  # hard limit for its subprocess


class Check:
    """Runs the steps; owns the output directory, the clock and how a command is launched."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool, gpus: int = 0):
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.gpus = gpus  # the multi-GPU steps' GPUs (0: torch.cuda.device_count())
        self.start = time.monotonic()
        self.rows: list[dict] = []
        self.info: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run_module(self, module: str, argv: list[str], log: str, *, cap_s: float, env: dict | None = None) -> int:
        """`python -m module *argv` with stdout/stderr to DIR/log: a subprocess killed at min(cap, budget left) on
        CUDA; in the dry run, `module.main(argv)` in this process (same arguments, same log)."""
        env = {**(env or {}), "RLHF_FAST_BENCH_RESULTS": str(self.out)}
        path = self.out / log
        if not self.dry_run:
            timeout = max(1.0, min(cap_s, self.left()))
            with open(path, "w") as f:
                try:
                    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT, env={**os.environ, **env}, timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    f.write(f"\n[gpu_check] killed after {timeout:.0f} s (step cap {cap_s:.0f} s / budget)\n")
                    return 124
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with open(path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                try:
                    rc = importlib.import_module(module).main(argv)
                    return int(rc or 0)
                except SystemExit as e:
                    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except Exception:  # noqa: BLE001 - a failing step is reported, the check goes on
                    traceback.print_exc()
                    return 1
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, steps: list[Step]) -> int:
        for i, step in enumerate(steps, 1):
            left = self.left()
            t0 = time.monotonic()
            if left < step.needs_s:
                outcome = Outcome("skipped", f"budget: {max(left, 0):.0f} s left, the step needs ~{step.needs_s:.0f} s")
            else:
                try:
                    outcome = step.fn(self)
                except Exception as e:  # noqa: BLE001
                    outcome = Outcome("failed", f"{type(e).__name__}: {e}")
                    (self.out / f"{step.name.replace('/', '_')}.error.log").write_text(traceback.format_exc())
            secs = round(time.monotonic() - t0, 1)
            targets = outcome.targets or [Target("")]
            for t in targets:
                self.rows.append(dict(n=i, step=step.name, kind=step.kind, status=outcome.status, time_s=secs,
                                      metric=t.metric, value=_fmt(t.value), target=t.target,
                                      met="" if t.met is None else ("yes" if t.met else "NO"), detail=outcome.detail))
            print(f"[gpu_check] {step.name}: {outcome.status} in {secs} s {outcome.detail}", flush=True)
            self.write_summary()  # after every step: a check cut off by the end of a GPU window keeps what it has
        return 1 if any(r["status"] == "failed" or r["met"] == "NO" for r in self.rows) else 0

    def write_summary(self) -> None:
        total = round(time.monotonic() - self.start, 1)
        cols = ["n", "step", "kind", "status", "time_s", "metric", "value", "target", "met", "detail"]
        with open(self.out / "summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        (self.out / "summary.json").write_text(json.dumps(
            {"info": self.info, "budget_s": self.budget_s, "total_s": total, "dry_run": self.dry_run,
             "rows": self.rows}, indent=2))
        lines = [f"# GPU check{' (dry run: CPU, Triton interpreter, tiny shapes)' if self.dry_run else ''}", ""]
        lines += [f"- {k}: {v}" for k, v in self.info.items()]
        lines += [f"- total: {total} s of a {self.budget_s:.0f} s budget", "",
                  "| # | step | status | time (s) | metric | value | target | met | detail |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r[c]).replace("|", "/") for c in
                                           ("n", "step", "status", "time_s", "metric", "value", "target", "met",
                                            "detail")) + " |")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rows(chk: Check, name: str) -> list[dict]:
    path = chk.out / f"{name}{'_dryrun' if chk.dry_run else ''}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _bench(chk: Check, module: str, argv: list[str], cap_s: float) -> int:
    mode = ["--dry-run"] if chk.dry_run else ["--gpu"]
    return chk.run_module(f"bench.{module}", [*mode, *argv], f"{module}.log", cap_s=cap_s)


def _pick(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _speed(row: dict) -> str:
    """'12.3 ms, 2950 GB/s' (or TFLOP/s) of a benchmark row."""
    unit = f"{row['GB_per_s']} GB/s" if "GB_per_s" in row else f"{row.get('TFLOP_per_s')} TFLOP/s"
    return f"{row.get('time_ms')} ms, {unit}"


def _frac_target(row: dict | None, what: str, key: str, at_least: float) -> Target:
    if row is None:
        return Target(what, "row missing", f"{key} >= {at_least}", False)
    val = row.get(key)
    return Target(f"{what}: {_speed(row)}", "n/a (no peak for this device)" if val is None else val,
                  f"{key} >= {at_least}", None if val is None else val >= at_least)


def _done(rc: int, log: str, targets: list[Target]) -> Outcome:
    return Outcome("passed" if rc == 0 else "failed", f"exit {rc}; see {log}", targets)
