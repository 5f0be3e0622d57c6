"""`rlhf-fast pipeline` end to end at a toy size through the CLI, and its resume behaviour."""
import json
import logging
from pathlib import Path

import pytest
import torch
from _tiny import one_thread

from rlhf_fast.cli import main

TOY = ["threads=1", "task.n_sft=48", "task.n_rm=24", "task.n_ppo=16", "task.n_eval=8", "task.max_items=3",
       "sft.arch.hidden_size=32", "sft.arch.num_layers=1", "sft.arch.num_heads=2", "sft.arch.num_kv_heads=1",
       "sft.arch.intermediate_size=64", "sft.epochs=1", "sft.batch_size=16", "rm.epochs=1", "rm.batch_size=8",
       "ppo.iterations=2", "ppo.prompts_per_iter=8", "ppo.minibatch_size=8", "ppo.sampling.max_new_tokens=6",
       "ppo.ptx_coef=0.1"]


def test_pipeline_end_to_end_then_resume(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    argv = ["pipeline", "--out", str(out)] + [a for kv in TOY for a in ("--set", kv)]
    with one_thread():
        assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("sft_eval_loss", "rm_accuracy", "win_rate", "mean_kl", "mean_reward_sft", "mean_reward_ppo",
                "wall_time_s"):
        assert isinstance(report[key], float), key
    assert 0 <= report["win_rate"] <= 1 and 0 <= report["rm_accuracy"] <= 1
    assert report["win_rate_judge"] == "labeler" and report["eval_prompts"] == 8
    assert report["eval_samples"] == 4  # the default: 8 prompts x 4 comparisons, a tie counting half
    assert abs(report["win_rate"] * 64 - round(report["win_rate"] * 64)) < 1e-9
    assert json.loads(capsys.readouterr().out)["win_rate"] == report["win_rate"]
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "metrics.jsonl").is_file()
    trunc = {st: {Path(f).name: c for f, c in d.items()} for st, d in report["truncation"].items()}  # what was cut
    n_lines = lambda f: len((out / "data" / f).read_text().splitlines())  # noqa: E731
    assert trunc["sft"]["sft_train.jsonl"]["examples"] == n_lines("sft_train.jsonl")  # nothing cut on the task
    assert trunc["rm"]["rm_train.jsonl"]["examples"] == n_lines("rm_train.jsonl")
    assert trunc["ppo"]["ppo_prompts.jsonl"] == {"examples": n_lines("ppo_prompts.jsonl"), "prompts_cut": 0,
                                                 "responses_cut": 0, "dropped": 0, "pairs_dropped": 0}
    assert (out / "curves.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["ppo"]["ptx_coef"] == 0.1
    ppo_log = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_log] == [1, 2] and "ptx_loss" in ppo_log[0]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(out / "ppo" / "final" / "policy"))

    kept = {p: p.read_bytes() for p in [out / "config.json", out / "report.json", *(out / "data").iterdir()]}
    with one_thread(), caplog.at_level(logging.WARNING):  # rerunning a finished run says so, for every stage
        assert main(argv) == 0
    assert caplog.text.count("already finished") == 3
    assert torch.get_num_threads() >= 1
    capsys.readouterr()
    assert main(argv + ["--set", "task.seed=999"]) == 2  # another config: refused, naming the key
    assert "task.seed: 1234 -> 999" in capsys.readouterr().err
    assert all(p.read_bytes() == b for p, b in kept.items())  # nothing of the finished run rewritten


def test_pipeline_config_errors_exit_2(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path), "--set", "ppo.klcoef=1"]) == 2
    assert "ppo.klcoef: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pipeline", "--bogus"])


def test_custom_data_needs_all_paths(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path), "--set", "sft.train_data=x.jsonl"]) == 2
    assert "also set rm.train_data, ppo.prompts, eval_prompts" in capsys.readouterr().err


def test_pipeline_on_given_data_judges_with_the_reward_model(tmp_path):
    from rlhf_fast.config import PipelineConfig, load_config
    from rlhf_fast.default_task import build_tokenizer, write_task_data
    from rlhf_fast.stages.pipeline import run_pipeline

    build_tokenizer(tmp_path / "tok")
    cfg = load_config(PipelineConfig, None, TOY)
    d = write_task_data(tmp_path / "data", cfg.task)
    custom = [f"sft.tokenizer={tmp_path / 'tok'}", f"sft.train_data={d['sft_train']}", f"rm.train_data={d['rm_train']}",
              f"rm.eval_data={d['rm_eval']}", f"ppo.prompts={d['ppo_prompts']}", f"eval_prompts={d['ppo_eval']}",
              "ppo.ptx_coef=0", "ppo.iterations=1"]
    with one_thread():
        report = run_pipeline(load_config(PipelineConfig, None, TOY + custom), tmp_path / "run")
    assert report["win_rate_judge"] == "reward_model" and 0 <= report["win_rate"] <= 1
    assert report["sft_eval_loss"] is None  # no SFT eval data given: null, not a made-up number
    json.loads((tmp_path / "run" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert "correct_ppo" not in report
