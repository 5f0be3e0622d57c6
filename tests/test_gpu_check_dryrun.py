"""bench/gpu_check.py before its first GPU: the whole check as a CPU dry run (Triton interpreter, tiny shapes), the
budget guard, the subprocess launcher, the arch choice and the device peak table."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check, roofline

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_a_summary_with_every_step_passed_or_skipped(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    steps = {row["step"]: row["status"] for row in rows}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert set(steps.values()) <= {"passed", "skipped"}, steps
    # only the CUDA-only parts are skipped in the dry run; everything else ran
    assert {s for s, st in steps.items() if st == "skipped"} <= {"build", "perf/ppo_iteration"}, steps
    assert all(float(row["time_s"]) >= 0 for row in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "| correctness | passed |" in summary and "dry run" in summary
    tests = {row["metric"]: row["value"] for row in rows if row["step"] == "correctness"}
    assert int(tests.pop("tests passed")) >= 10 and int(tests.pop("tests failed")) == 0
    per_test = {k: v for k, v in tests.items() if "::" in k}  # one row per test function
    assert "passed" in per_test.values() and "failed" not in per_test.values(), per_test
    launches = next(row for row in rows if row["metric"].startswith("GAE + whitening Triton launches"))
    assert (launches["value"], launches["met"]) == ("2", "yes")
    det = next(row for row in rows if row["metric"].endswith("(deterministic)"))
    assert (det["value"], det["met"]) == ("0", "yes")  # rollout log-probs bitwise equal to the recompute
    for name in ("logprobs_gpu", "fused_ppo_gpu", "bench_gae_gpu", "paged_attention_gpu", "rollout_gpu",
                 "bench_losses_gpu"):
        bench_rows = json.loads((tmp_path / f"{name}_dryrun.json").read_text())["rows"]
        assert bench_rows and all("time_ms" in b or "case" in b for b in bench_rows), name
    assert "RLHF_FAST_CUDA_ARCHS=90a" in (tmp_path / "build.log").read_text()
    # multi-GPU mode on CPU processes: tp 2 against one process, per-rank bytes equal to the memory model's
    tp = {row["metric"]: (row["value"], row["met"]) for row in rows if row["step"] == "multi_gpu/tp"}
    assert tp["dp1 x tp2: first SFT step loss, rel. diff vs 1 GPU"][1] == "yes", tp
    assert tp["dp1 x tp2: gradient norm, rel. diff vs 1 GPU"][1] == "yes", tp
    formula = [v for k, v in tp.items() if k.endswith("= memory_model formula")]
    assert len(formula) == 2 and all(v == ("equal", "yes") for v in formula), tp
    assert json.loads((tmp_path / "summary.json").read_text())["dry_run"] is True


def test_multi_gpu_mode_layouts_and_one_gpu(tmp_path, monkeypatch):
    """The multi-GPU step's layouts per GPU count; with one GPU (or --gpus 1) it is skipped and launches nothing."""
    from bench.bench_scaling import gpu_layouts

    assert gpu_layouts(2) == [(1, 1), (2, 2)]
    assert gpu_layouts(4) == [(1, 1), (2, 2), (4, 4), (4, 2)]
    assert gpu_layouts(8) == [(1, 1), (2, 2), (4, 4), (8, 8), (8, 2)]
    chk = gpu_check.Check(tmp_path, budget_s=60.0, dry_run=False, gpus=1)
    monkeypatch.setattr(chk, "run_module", lambda *a, **k: pytest.fail("launched with one GPU"))
    out = gpu_check.step_multi_gpu_tp(chk)
    assert out.status == "skipped" and "needs >= 2" in out.detail
    assert gpu_check.multi_gpu_count(gpu_check.Check(tmp_path, 60.0, dry_run=True)) == 2
    assert "multi_gpu/tp" in [s.name for s in gpu_check.STEPS]


def test_budget_guard_reports_unreached_steps_as_skipped(tmp_path):
    chk = gpu_check.Check(tmp_path, budget_s=5.0, dry_run=True)
    ran = []

    def quick(c):
        ran.append("quick")
        return gpu_check.Outcome("passed", targets=[gpu_check.Target("x", 1.0, ">= 0.5", True)])

    steps = [gpu_check.Step("a", "perf", quick, 0, 10), gpu_check.Step("b", "perf", quick, 60, 10),
             gpu_check.Step("c", "perf", lambda c: 1 / 0, 0, 10)]
    rc = chk.run(steps)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [(r["step"], r["status"]) for r in rows] == [("a", "passed"), ("b", "skipped"), ("c", "failed")]
    assert ran == ["quick"] and rc == 1
    assert "budget" in rows[1]["detail"] and "ZeroDivisionError" in rows[2]["detail"]
    assert rows[0]["met"] == "yes" and (tmp_path / "summary.md").exists()


def test_subprocess_launcher_logs_and_kills_at_the_cap(tmp_path):
    chk = gpu_check.Check(tmp_path, budget_s=60.0, dry_run=False)
    assert chk.run_module("platform", [], "platform.log", cap_s=30) == 0
    assert (tmp_path / "platform.log").read_text().strip()
    rc = chk.run_module("timeit", ["-n", "1", "-r", "1", "import time; time.sleep(20)"], "sleep.log", cap_s=1)
    assert rc == 124 and "killed after" in (tmp_path / "sleep.log").read_text()


def test_arch_and_build_commands():
    assert gpu_check.cuda_archs((9, 0)) == "90a" and gpu_check.cuda_archs((8, 0)) == "80"
    assert gpu_check.cuda_archs((8, 9)) == "89" and gpu_check.cuda_archs((10, 0)) == "100"
    cmds, env = gpu_check.build_commands("90a", installed=False)
    assert env["RLHF_FAST_CUDA_ARCHS"] == "90a" and env["RLHF_FAST_REQUIRE_NATIVE"] == "1"
    assert cmds[0][1:4] == ["setup.py", "build_ext", "--inplace"] and cmds[1][-2:] == ["-e", "."]
    assert len(gpu_check.build_commands("80", installed=True)[0]) == 1


def test_peak_table_by_device_name():
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA A100-SXM4-80GB": "A100 SXM 80GB", "NVIDIA A100-SXM4-40GB": "A100 SXM 40GB",
             "NVIDIA A100 80GB PCIe": "A100 PCIe 80GB", "NVIDIA A100-PCIE-40GB": "A100 PCIe 40GB"}
    for reported, label in names.items():
        assert roofline.peak_for(reported).name == label, reported
    assert roofline.peak_for("AMD EPYC 7B13 (2 cores)") is None
    h100 = roofline.peak_for("NVIDIA H100 80GB HBM3")
    got = roofline.fractions("NVIDIA H100 80GB HBM3", 2847.5, 494.7, "bfloat16", memcpy=3000.0)
    assert got == {"hbm_fraction": round(2847.5 / h100.hbm_gbs, 3), "memcpy_fraction": 0.949,
                   "matmul_peak_fraction": 0.5}
    assert roofline.fractions("cpu", 10.0, 1.0, "float32") == {}


def test_rooflines_count_the_compulsory_traffic():
    assert roofline.token_logprobs(8192, 151936, 2).bytes == pytest.approx(8192 * 151936 * 2, rel=1e-3)
    assert roofline.token_logprobs(10, 100, 2, backward=True).bytes > 3 * 10 * 100 * 2
    assert roofline.linear_logprobs(16384, 4096, 151936, 2).flops == 6.0 * 16384 * 4096 * 151936
    assert roofline.gae(8 << 20).bytes == 17 * (8 << 20)
    assert roofline.gae(100, whiten=True).bytes == 100 * (17 + 9)
    pd = roofline.paged_decode(32, 32, 8, 128, 2048, 2)
    assert pd.bytes == 2 * 32 * 2048 * 8 * 128 * 2 + 2 * 32 * 32 * 128 * 2 and pd.flops == 4.0 * 32 * 32 * 2048 * 128


def test_build_step_runs_its_commands_and_probes_the_extension(tmp_path, monkeypatch):
    """The non-dry build path with the real commands swapped for a stand-in (no nvcc build on CI)."""
    monkeypatch.setattr(gpu_check, "_installed_here", lambda: True)
    monkeypatch.setattr(gpu_check, "build_commands",
                        lambda archs, installed: ([[sys.executable, "-c", f"print('building {archs}')"]],
                                                  {"RLHF_FAST_CUDA_ARCHS": archs}))
    out = gpu_check.step_build(gpu_check.Check(tmp_path, budget_s=60.0, dry_run=False))
    assert "building 90a" in (tmp_path / "build.log").read_text()
    assert out.targets[0].value == "90a" and "built_with_cuda" in out.detail
    assert out.status == ("passed" if gpu_check._native_probe_ok() else "failed")


def test_ppo_iteration_arguments_follow_its_cli():
    assert gpu_check.ppo_iteration_argv("  --quick  --hidden N") == ["--quick"]
    assert gpu_check.ppo_iteration_argv("--quick --gpu --iters N") == ["--gpu", "--iters", "1"]
    assert gpu_check.ppo_iteration_argv("--gpu") == ["--gpu"]
    assert "--quick" in gpu_check._cli_help("bench.bench_ppo_iteration")


def test_every_triton_op_and_cuda_kernel_has_a_gpu_test():
    """A kernel added later without a GPU test fails here, not on the first GPU."""
    import rlhf_fast.ops  # noqa: F401 - registers every op
    from rlhf_fast.backend import registered_ops

    text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_gpu_*.py"))
    missing = [name for name, spec in registered_ops().items() if spec.triton and not re.search(rf"\b{name}\b", text)]
    missing += [spec.native_cuda for spec in registered_ops().values()
                if spec.native_cuda and f'native_cuda("{spec.native_cuda}")' not in text]
    assert not missing, f"no GPU test calls {missing} (add one to tests/test_gpu_*.py)"
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        assert any(spec.native_cuda and spec.native_cuda.startswith(cu.stem) for spec in registered_ops().values()), \
            f"{cu.name} exports no op registered with native_cuda="
