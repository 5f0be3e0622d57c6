"""The real `rlhf-fast` command in a subprocess: one line and exit code 2 for the project's errors (the traceback
with --debug), a "stage: starting" line, no hub lookups, an honest `env`."""
import os
import subprocess
import sys
import time

import yaml
from _tiny import tiny_sft_config

from rlhf_fast.config import to_dict
from rlhf_fast.stages.sft import train_sft


def rlhf_fast(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rlhf-fast ")]


def test_missing_model_path_and_hub_name_fail_at_once(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    rc, _, err, _ = rlhf_fast("sft", "--set", f"model={tmp_path / 'nope'}", "--set", f"train_data={data}",
                              "--out", tmp_path / "run")
    assert rc == 2 and "no such directory" in errors(err)[0] and "Traceback" not in err
    assert "sft: starting in" in err  # a plain progress line, stderr being no terminal
    rc, _, err, seconds = rlhf_fast("sft", "--set", "model=gpt2", "--set", f"train_data={data}", "--out",
                                    tmp_path / "run2")
    assert rc == 2 and "hub downloads are off" in errors(err)[0] and seconds < 60
    rc, _, err, _ = rlhf_fast("sft", "--set", "optim.lr=.inf", "--out", tmp_path / "run3")
    assert rc == 2 and errors(err) == ["rlhf-fast sft: config error: optim.lr: expected a finite number, got inf"]


def test_damaged_checkpoint_is_one_line_and_debug_shows_the_traceback(task, tmp_path):
    root, _, paths = task
    cfg = tiny_sft_config(root, paths, epochs=1, eval_data="", save_every=1)
    train_sft(cfg, tmp_path / "run", stop_after=2)
    for d in ("checkpoint", "checkpoint.1"):
        (tmp_path / "run" / d / "state" / ".metadata").unlink()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    rc, _, err, _ = rlhf_fast("sft", "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "run")
    assert rc == 2 and len(errors(err)) == 1 and "Traceback" not in err
    assert "checkpoint error: no intact checkpoint" in err and "state/.metadata: missing" in err
    rc, _, err, _ = rlhf_fast("sft", "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "run", "--debug")
    assert rc != 0 and "Traceback" in err and "CheckpointError" in err


def test_env_says_compiled_no_device(monkeypatch):
    import torch

    from rlhf_fast import _native, env_report

    monkeypatch.setattr(_native, "built_with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert env_report.report()["native_cuda_kernels"] == "compiled, no device"


def test_missing_native_extension_warns():
    code = ("import sys, warnings; sys.modules['rlhf_fast._C'] = None; warnings.simplefilter('error'); "
            "import rlhf_fast._native")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode != 0 and "RuntimeWarning" in p.stderr and "not available" in p.stderr
