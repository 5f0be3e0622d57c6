"""PPO on a tiny random model: one update improves its objective, rollout tensors line up with the engine, the
stage resumes exactly, early stop on approx KL."""
import os

import pytest
import torch
from _tiny import TINY_ARCH, rows

from rlhf_fast.config import KLConfig, OptimConfig, PPOConfig, SamplingConfig
from rlhf_fast.default_task import build_model
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import load_model, save_model
from rlhf_fast.stages import experience as xp
from rlhf_fast.stages import packed_passes as pp
from rlhf_fast.stages.ppo import PPOTrainer, train_ppo


@pytest.fixture(scope="module")
def ppo_models(task, tmp_path_factory):
    root, tok, paths = task
    d = tmp_path_factory.mktemp("ppo_models")
    policy = build_model(TINY_ARCH, tok, seed=3)
    save_model(policy, d / "policy", tokenizer=tok)
    ScalarHeadModel(build_model(TINY_ARCH, tok, seed=4)).save_pretrained(d / "rm")
    return d


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_ppo_update_improves_the_objective_on_a_fixed_batch(task, ppo_models, placement):
    root, tok, paths = task
    cfg = PPOConfig(sampling=SamplingConfig(max_new_tokens=6, n=2), minibatch_size=16, ppo_epochs=1, ptx_coef=0.1,
                    optim=OptimConfig(lr=1e-3, schedule="constant"), entropy_coef=0.01,
                    kl=KLConfig(coef=0.1, placement=placement))
    policy = load_model(ppo_models / "policy")
    value = ScalarHeadModel.from_pretrained(ppo_models / "rm")
    ref = load_model(ppo_models / "policy").requires_grad_(False)
    rm = ScalarHeadModel.from_pretrained(ppo_models / "rm").requires_grad_(False)
    ptx = [tok(r["text"])["input_ids"] for r in rows(paths["ptx"])[:8]]
    trainer = PPOTrainer(cfg, policy, value, ref, rm, tok, ptx)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:8]]
    exp, times = trainer.collect(prompts, 0)
    assert exp.rollout.input_ids.shape[0] == 16 and set(times) >= {"time_generate", "time_score"}
    # fresh samples: old_logp is the rollout's own (reused), the reference (= the policy here) is recomputed, so the
    # first ratio is 1 and the KL to ref is 0 up to the engine / training-forward rounding (<= 1e-6 per token)
    torch.testing.assert_close(exp.old_logp, exp.ref_logp, atol=1e-6, rtol=0)
    assert float(exp.kl.abs().max()) <= 1e-6 * exp.rollout.mask.sum(1).max()
    with torch.no_grad():
        before = trainer.minibatch_loss(exp, [])[1]
    for _ in range(8):
        stats = trainer.update(exp, 0)
    with torch.no_grad():
        after = trainer.minibatch_loss(exp, [])[1]
    assert after["pg_loss"] < before["pg_loss"] - 1e-3
    assert after["vf_loss"] < before["vf_loss"]
    assert "ptx_loss" in stats and trainer.skipped == 0


def test_ppo_logprobs_line_up_with_the_engine(task, ppo_models):
    """The response tensors are aligned: recomputed log-probs equal the engine's sampled-token log-probs."""
    root, tok, paths = task
    from rlhf_fast.rollout import RolloutEngine, SamplingParams
    policy = load_model(ppo_models / "policy").eval()
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:5]]
    comps = RolloutEngine(policy).generate(prompts, SamplingParams(max_new_tokens=5, n=2, seed=1))
    ro = xp.make_rollout(prompts, comps, tok.pad_token_id)
    with torch.no_grad():
        logp = pp.policy_logprobs(policy, ro, 1.0)
    for i, c in enumerate(comps):
        torch.testing.assert_close(logp[i, : len(c.token_ids)], c.logprobs, atol=1e-4, rtol=0)
        assert ro.mask[i].sum() == len(c.token_ids)


def test_ppo_stage_runs_and_resumes_exactly(task, ppo_models, tmp_path):
    root, tok, paths = task
    cfg = PPOConfig(policy=str(ppo_models / "policy"), reward_model=str(ppo_models / "rm"),
                    prompts=paths["ppo_prompts"], iterations=2, prompts_per_iter=4,
                    sampling=SamplingConfig(max_new_tokens=5, n=2), minibatch_size=4, kl=KLConfig(target=1.0, coef=0.1))
    full = train_ppo(cfg, tmp_path / "full", plots=False)
    train_ppo(cfg, tmp_path / "part", stop_after=1)
    resumed = train_ppo(cfg, tmp_path / "part", plots=False)
    assert full.iterations == resumed.iterations == 2
    for load, da, db in ((ScalarHeadModel.from_pretrained, full.value_dir, resumed.value_dir),
                         (load_model, full.policy_dir, resumed.policy_dir)):
        a, b = load(da).state_dict(), load(db).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full.value_dir / "tokenizer_config.json").is_file()  # the value model has its tokenizer too
    mode = 0o666 & ~_umask()
    assert all((d / f).stat().st_mode & 0o777 == mode for d in (full.policy_dir, full.value_dir)
               for f in ("model.safetensors", "config.json"))  # model files like every other file
    log = rows(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and log[-1]["kl_coef"] != 0.1  # the adaptive KL moved
    untimed = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in log]
    assert [{k: v for k, v in r.items() if not k.startswith("time_")}
            for r in rows(tmp_path / "part" / "metrics.jsonl")] == untimed


def test_ppo_early_stop_on_approx_kl(task, ppo_models):
    root, tok, paths = task
    cfg = PPOConfig(sampling=SamplingConfig(max_new_tokens=4, n=2), minibatch_size=4, ppo_epochs=3, early_stop_kl=1e-12,
                    optim=OptimConfig(lr=1e-3, schedule="constant"))
    policy = load_model(ppo_models / "policy")
    ref = load_model(ppo_models / "policy").requires_grad_(False)
    value, rm = (ScalarHeadModel.from_pretrained(ppo_models / "rm") for _ in range(2))
    trainer = PPOTrainer(cfg, policy, value, ref, rm.requires_grad_(False), tok)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:8]]
    exp, _ = trainer.collect(prompts, 0)
    stats = trainer.update(exp, 0)
    # the first minibatch is on-policy (approx KL exactly 0); after one step the second one exceeds the limit
    assert stats["early_stopped"] == 1.0
    steps = {int(s["step"]) for s in trainer.opt.state.values()}
    assert steps == {2}  # instead of 3 epochs x 4 minibatches


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_compile_rollout_reaches_the_engine(task, ppo_models):
    """`ppo.compile_rollout` builds the rollout engine with its compiled decode step (tests/test_compiled_decode.py
    checks that step against eager); off by default."""
    root, tok, paths = task
    models = (load_model(ppo_models / "policy"), ScalarHeadModel.from_pretrained(ppo_models / "rm"),
              load_model(ppo_models / "policy").requires_grad_(False),
              ScalarHeadModel.from_pretrained(ppo_models / "rm").requires_grad_(False))
    assert not PPOTrainer(PPOConfig(), *models, tok).generator.decode_step.compiled
    assert PPOTrainer(PPOConfig(compile_rollout=True), *models, tok).generator.decode_step.compiled
