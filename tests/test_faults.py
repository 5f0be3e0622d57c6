"""Faults and reruns of a run directory: damaged checkpoints, full disks, torn metrics, a changed config, a second
process, a reward model without its head, weights that diverge, LoRA dropout during PPO."""
import dataclasses
import errno
import logging
import subprocess
import sys
import time

import pytest
import torch
from _tiny import TINY_ARCH, rows, tiny_sft_config

from rlhf_fast import checkpoint
from rlhf_fast.checkpoint import STATE_FILE, CheckpointError, find_checkpoint, load_state
from rlhf_fast.config import ConfigError, OptimConfig, PPOConfig, SamplingConfig
from rlhf_fast.default_task import build_model
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models.loading import ModelLoadError
from rlhf_fast.stages.common import DivergedError, MetricsLog, guarded_step, make_optimizer
from rlhf_fast.stages.run_state import RunDirError, run_dir_lock
from rlhf_fast.stages.sft import train_sft


def small(root, paths, **kw):
    return tiny_sft_config(root, paths, epochs=1, eval_data="", save_every=1, **kw)  # 8 steps, a save each


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(task, tmp_path, caplog):
    root, _, paths = task
    cfg = small(root, paths)
    train_sft(cfg, tmp_path / "run", stop_after=3)
    ck = tmp_path / "run" / "checkpoint"
    assert load_state(ck)["step"] == 3 and load_state(ck.with_name("checkpoint.1"))["step"] == 2
    assert not ck.with_name("checkpoint.2").exists()  # keep_checkpoints=2
    weights = next((ck / "state").glob("*.distcp"))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated model/optimiser shard
    with caplog.at_level(logging.WARNING):
        res = train_sft(cfg, tmp_path / "run")
    assert str(weights) in caplog.text and "damaged" in caplog.text and res.steps == 8
    full = train_sft(cfg, tmp_path / "full")
    from safetensors.torch import load_file
    wa, wb = load_file(str(res.model_dir / "model.safetensors")), load_file(str(full.model_dir / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # resumed from step 2: still the uninterrupted result


def test_every_checkpoint_damaged_names_the_file(task, tmp_path):
    root, _, paths = task
    cfg = small(root, paths)
    train_sft(cfg, tmp_path / "run", stop_after=2)
    for d in ("checkpoint", "checkpoint.1"):
        (tmp_path / "run" / d / STATE_FILE).unlink()  # no silent restart from step 0
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: missing"):
        train_sft(cfg, tmp_path / "run")


def test_torn_metrics_line_and_stale_temp_dirs_do_not_block_resume(task, tmp_path):
    root, _, paths = task
    cfg = small(root, paths)
    run = tmp_path / "run"
    train_sft(cfg, run, stop_after=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed mid-write
    (run / ".checkpoint.tmp-99999").mkdir()
    res = train_sft(cfg, run)
    assert res.steps == 8 and not (run / ".checkpoint.tmp-99999").exists()
    assert [r["step"] for r in rows(run / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_full_disk_is_named_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, {}, {"step": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match="no space left on device"):
        checkpoint.save_checkpoint(path, {}, {"step": 2})
    assert load_state(find_checkpoint(path))["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_rerun_with_another_config_names_the_keys(task, tmp_path):
    root, _, paths = task
    cfg = small(root, paths)
    train_sft(cfg, tmp_path / "run", stop_after=2)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-5), seed=7)
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 -> 1e-05; seed: 0 -> 7"):
        train_sft(other, tmp_path / "run")
    # allowed: save cadence; raising max_steps extends a finished run
    done = train_sft(dataclasses.replace(cfg, save_every=0, max_steps=4), tmp_path / "run")
    assert done.steps == 4
    more = train_sft(dataclasses.replace(cfg, max_steps=6), tmp_path / "run")
    assert more.steps == 6


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    code = ("import sys, time; from rlhf_fast.stages.run_state import run_dir_lock; "
            "lock = run_dir_lock(sys.argv[1]); lock.__enter__(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {proc.pid}"), run_dir_lock(tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while True:  # the lock dies with its holder
        try:
            with run_dir_lock(tmp_path), run_dir_lock(tmp_path):  # re-entrant within a process
                break
        except RunDirError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_reward_model_without_its_head_is_an_error(task, tmp_path):
    _, tok, _ = task
    build_model(TINY_ARCH, tok, seed=1).save_pretrained(tmp_path / "sft")
    with pytest.raises(ModelLoadError, match="no scalar_head.safetensors"):
        ScalarHeadModel.from_pretrained(tmp_path / "sft")
    assert ScalarHeadModel.from_pretrained(tmp_path / "sft", new_head=True).head.weight.shape == (1, 32)
    with pytest.raises(ModelLoadError, match="no such directory"):
        ScalarHeadModel.from_pretrained(tmp_path / "nope")


def test_weights_that_turn_non_finite_stop_the_run():
    p = torch.nn.Parameter(torch.tensor([3.3e38]))
    opt = make_optimizer([p], OptimConfig(lr=3e37))
    loss = -p.sum()
    loss.backward()
    with pytest.raises(DivergedError, match="became NaN/Inf"):  # loss and gradient finite; the update overflows
        guarded_step(loss.detach(), [[p]], opt, None, 0.0)


def test_metrics_are_strict_json(tmp_path):
    m = MetricsLog(tmp_path, "m")
    m.log(1, loss=float("nan"), x=float("inf"), y=1.0)
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1, "loss": null, "x": null, "y": 1.0}\n'


@pytest.mark.parametrize("dropout", [False, True])
def test_ppo_trains_without_dropout_unless_asked(task, dropout):
    """A GPT-2 policy with LoRA dropout 0.1 (the one dropout rlhf_fast's models have): at unchanged weights the
    train-mode ratio is exactly 1 only with dropout off."""
    from transformers import GPT2Config

    from rlhf_fast.config import LoRAConfig
    from rlhf_fast.models import build_model as build_decoder
    from rlhf_fast.models import lora
    from rlhf_fast.stages.ppo import PPOTrainer

    _, tok, paths = task
    gcfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    policy = build_decoder(gcfg, device="cpu")
    lora.apply_lora(policy, LoRAConfig(r=2, dropout=0.1), seed=0)
    with torch.no_grad():
        for m in lora.lora_modules(policy).values():
            m.lora_B.weight.normal_(0, 0.5)  # B = 0 at init: the adapters (and their dropout) must matter
    value, rm = (ScalarHeadModel(build_decoder(gcfg, lm_head=False, device="cpu")) for _ in range(2))
    cfg = PPOConfig(sampling=SamplingConfig(max_new_tokens=4, n=2), minibatch_size=8, dropout=dropout,
                    old_logp="recompute", lora=LoRAConfig(r=2, dropout=0.1))
    trainer = PPOTrainer(cfg, policy, value, policy, rm.requires_grad_(False), tok)  # LoRA: ref = adapters off
    exp, _ = trainer.collect([tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:4]], 0)
    policy.train()
    value.train()
    with torch.no_grad():
        stats = trainer.minibatch_loss(exp, [])[1]
    assert (stats["approx_kl"] == 0.0) == (not dropout)
