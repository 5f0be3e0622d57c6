"""A user's own Qwen2-style model and ChatML data from a directory outside the repo: a reward_fn next to the data,
what it receives, one-line errors (a failing reward_fn, an unsupported architecture, a wrong LoRA target, Ctrl-C),
max_steps beyond the epochs, progress lines in a log file, dtype spellings, prompts cut to fit max_new_tokens and
missing RM fields."""
import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from _chat_models import build_model, build_tokenizer, chat, chat_data, write_jsonl
from _tiny import one_thread, rows, tiny_sft_config
from rlhf_fast import cli
from rlhf_fast.config import PPOConfig, RMConfig, SFTConfig, load_config
from rlhf_fast.data import DataError, load_prompts, load_rm
from rlhf_fast.stages import common, run_state
from rlhf_fast.stages import reward_fn as rfn
from rlhf_fast.stages.sft import train_sft
from rlhf_fast.truncation import warn_prompts_cut

RECORDER = '''
CALLS = []


def exact(prompts, completions):
    CALLS.append((prompts, completions))
    return [float(len(c)) for c in completions]


def fails(prompts, completions):
    raise KeyError("no answer key")
'''


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A Qwen2 with a ChatML tokenizer (96 positions), a GPT-NeoX (no compact model), chat data, and a working
    directory outside the repo holding `myreward.py`."""
    root = tmp_path_factory.mktemp("friction")
    tok = build_tokenizer(root / "tok", bos=False)
    build_model("qwen2", tok, root / "qwen2", positions=96)
    import transformers as tf

    neox = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=64,
                                                  max_position_embeddings=96))
    neox.save_pretrained(str(root / "neox"))
    tok.save_pretrained(str(root / "neox"))
    work = root / "work"
    work.mkdir()
    (work / "myreward.py").write_text(RECORDER)
    files = chat_data(root / "data")
    mixed = [{"messages": chat(0)}, {"prompt": "hello how are you"}, {"messages": chat(1)}, {"prompt": "what is two"}]
    files["mixed"] = write_jsonl(root / "data" / "mixed.jsonl", mixed)
    return root, work, files


@pytest.fixture
def in_work_dir(own, monkeypatch):
    """The working directory is the user's, and neither it nor "" is on sys.path (the `rlhf-fast` script's case)."""
    _, work, _ = own
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    yield work
    sys.modules.pop("myreward", None)


def ppo_args(root, files, out, *extra):
    return ["ppo", "--set", f"policy={root / 'qwen2'}", "--set", f"prompts={files['mixed']}",
            "--set", "algorithm=grpo", "--set", "iterations=1", "--set", "prompts_per_iter=4", "--set", "sampling.n=2",
            "--set", "minibatch_size=8", *extra, "--out", str(out)]


def test_reward_fn_from_the_working_directory_gets_prompts_as_written(own, in_work_dir, caplog):
    root, _, files = own
    with one_thread(), caplog.at_level(logging.INFO):
        # 96 positions - 80 new tokens leave 16 per prompt: every chat prompt is cut, and the run says so
        assert cli.main(ppo_args(root, files, root / "ppo-fn", "--set", "reward_fn=myreward:exact",
                                 "--set", "sampling.max_new_tokens=80", "--debug")) == 0
    import myreward

    (prompts, completions), = myreward.CALLS
    written = [json.loads(line) for line in open(files["mixed"])]
    want = [w.get("messages", w.get("prompt")) for w in written]
    assert len(prompts) == 8 and all(p in want for p in prompts)  # the JSONL's string or messages, uncut
    assert {type(p) for p in prompts} == {str, list}
    assert all("<|im_end|>" not in c and "</s>" not in c for c in completions)
    assert "ppo: 2 of 4 prompts in" in caplog.text and "(50%) were cut to fit 16 tokens" in caplog.text
    assert "the model's 96 positions less sampling.max_new_tokens=80 leave 16" in caplog.text
    assert "ppo: step 1/1 (100%) reward" in caplog.text and "tok/s" in caplog.text  # no terminal: a progress line


def test_reward_fn_import_errors_name_the_directory(in_work_dir):
    with pytest.raises(rfn.ConfigError, match=r"cannot import module 'nowhere'.*looked in the current directory"):
        rfn.load("nowhere:f")
    with pytest.raises(rfn.ConfigError, match="has no attribute 'missing'"):
        rfn.load("myreward:missing")
    assert rfn.load("myreward:exact")(["p"], ["abc"]) == [3.0]


def test_one_line_errors(own, in_work_dir, capsys, monkeypatch):
    root, _, files = own
    # a reward_fn that raises: the line that names the sample is the only line
    assert cli.main(ppo_args(root, files, root / "ppo-fails", "--set", "reward_fn=myreward:fails",
                             "--set", "sampling.max_new_tokens=4")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf-fast ")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("rlhf-fast ppo: reward_fn error: ppo.reward_fn myreward:fails raised KeyError: "
                               "'no answer key' on sample 0 (prompt")
    # an architecture rlhf_fast's models do not cover: refused from config.json, before any weight loads
    from rlhf_fast.models import state_dict_adapter

    args = ppo_args(root, files, root / "ppo-neox", "--set", "reward_fn=myreward:exact")
    args[2] = f"policy={root / 'neox'}"
    with monkeypatch.context() as m:
        m.setattr(state_dict_adapter, "load_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
        assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "rlhf-fast ppo: model error: ppo.policy:" in err and "is a GPTNeoXForCausalLM" in err
    assert "rlhf_fast's models are " in err and all(name in err for name in ("GPT2LMHeadModel", "LlamaForCausalLM"))
    # a LoRA target the model does not have: one config error, with the names it has
    assert cli.main(["sft", "--set", f"model={root / 'qwen2'}", "--set", f"train_data={files['sft']}",
                     "--set", "lora.r=2", "--set", "lora.target_modules=qkv", "--out", str(root / "sft-lora")]) == 2
    err = capsys.readouterr().err
    assert "rlhf-fast sft: config error: lora.target_modules: qkv matches no projection" in err
    assert "named down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err


def test_ctrl_c_says_where_a_rerun_resumes(own, capsys, monkeypatch, caplog):
    root, _, files = own
    args = ["sft", "--set", f"model={root / 'qwen2'}", "--set", f"train_data={files['sft']}", "--set", "batch_size=2",
            "--set", "max_steps=5", "--set", "save_every=2", "--out", str(root / "sft-int")]
    optimizer_step = run_state.TrainRun.optimizer_step

    def interrupted_at_the_third(self, *a, **k):
        inner = optimizer_step(self, *a, **k)

        def step(i):
            if i == 2:
                raise KeyboardInterrupt
            return inner(i)
        return step

    monkeypatch.setattr(run_state.TrainRun, "optimizer_step", interrupted_at_the_third)
    with one_thread():
        assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "rlhf-fast sft: interrupted in sft at step 2; rerun the same command to resume from step 2" in err
    assert "Traceback" not in err
    monkeypatch.setattr(run_state.TrainRun, "optimizer_step", optimizer_step)
    with one_thread(), caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    assert "resuming" in caplog.text and "at step 2/5" in caplog.text
    assert [r["step"] for r in rows(root / "sft-int" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    run_state._current = None
    assert "before training started" in run_state.interrupted_line()
    monkeypatch.setattr(run_state, "_current", SimpleNamespace(name="ppo", step=3, saved_step=None, finished=False))
    assert "ppo at step 3, before its first checkpoint; rerun the same command to start ppo again from step 0" in \
        run_state.interrupted_line()


def test_max_steps_drives_the_length_and_resumes(task, tmp_path, caplog, monkeypatch):
    root, _, paths = task  # 64 examples, batch 8: 8 steps an epoch
    cfg = tiny_sft_config(root, paths, epochs=1, max_steps=20, eval_data="")
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)  # a line at every step
    with one_thread(), caplog.at_level(logging.INFO):
        whole = train_sft(cfg, tmp_path / "whole")
        train_sft(cfg, tmp_path / "parts", stop_after=11)  # stops in the second epoch
        parts = train_sft(cfg, tmp_path / "parts")
    assert whole.steps == parts.steps == 20
    assert "sft: 20 steps (max_steps; 2.5 epochs of 8 steps)" in caplog.text
    assert "sft: step 20/20 (100%) loss" in caplog.text and "ETA 0s" in caplog.text
    from safetensors.torch import load_file

    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed in the repeated epochs: the same weights


@pytest.mark.parametrize("cls", [SFTConfig, RMConfig, PPOConfig])
def test_dtype_spellings(cls):
    for spelled, dtype, autocast in [("bf16", "bfloat16", "bf16"), ("bfloat16", "bfloat16", "bf16"),
                                     ("fp32", "float32", "no"), ("float32", "float32", "no")]:
        cfg = load_config(cls, overrides=[f"model_dtype={spelled}", f"mixed_precision={spelled}"])
        assert (cfg.model_dtype, cfg.mixed_precision) == (dtype, autocast)
    assert load_config(cls, overrides=["model_dtype=fp16"]).model_dtype == "float16"
    assert load_config(cls, overrides=["mixed_precision=no"]).mixed_precision == "no"  # YAML 1.1 would say False
    with pytest.raises(rfn.ConfigError, match="fp16 autocast is not supported"):
        load_config(cls, overrides=["mixed_precision=fp16"])


def test_dropout_still_takes_yes_and_no():
    assert load_config(RMConfig, overrides=["dropout=yes"]).dropout is True
    assert load_config(PPOConfig, overrides=["dropout=off"]).dropout is False


def test_few_cut_prompts_do_not_warn(own, caplog):
    root, _, files = own
    tok = build_tokenizer(root / "tok2", bos=False)
    rows_ = [{"prompt": "hello"}] * 40 + [{"messages": chat(0, turns=6)}]
    path = write_jsonl(root / "data" / "one-long.jsonl", rows_)
    prompts = load_prompts(path, tok, 30)
    assert prompts.counts.prompts_cut == 1 and len(prompts.full_lengths) == 41
    log = logging.getLogger("test")
    assert not warn_prompts_cut(prompts, path, budget=30, max_len=30, positions=None, max_new_tokens=8, log=log)
    prompts = load_prompts(path, tok, 2)
    with caplog.at_level(logging.WARNING):
        assert warn_prompts_cut(prompts, path, budget=2, max_len=2, positions=None, max_new_tokens=8, log=log)
    assert "ppo.max_len=2; raise it" in caplog.text


def test_rm_line_without_ranks_says_it_is_missing(own):
    root, _, _ = own
    tok = build_tokenizer(root / "tok3", bos=False)
    path = write_jsonl(root / "data" / "no-ranks.jsonl", [{"prompt": "a", "completions": ["b", "c"]}])
    with pytest.raises(DataError, match=r"no-ranks.jsonl:1: missing key 'ranks' \(has \['completions', 'prompt'\]"):
        load_rm(path, tok, 64)
    path = write_jsonl(root / "data" / "bad-ranks.jsonl", [{"prompt": "a", "completions": ["b", "c"], "ranks": "01"}])
    with pytest.raises(DataError, match="'ranks' must be a list of integers"):
        load_rm(path, tok, 64)
