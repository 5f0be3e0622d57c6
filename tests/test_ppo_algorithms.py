"""The PPO stage's critic-free algorithms (grpo, dr_grpo, dapo, rloo, reinforce_pp) on a tiny random model: the
advantages are the group estimators of the sequence rewards, no value model exists, an update improves the
objective, the stage runs end to end; `ppo.reward_fn` scores, and its failures stop the run before an update."""
import pytest
import torch
from _tiny import TINY_ARCH, rows

from rlhf_fast import ops
from rlhf_fast.config import ConfigError, OptimConfig, PPOConfig, SamplingConfig, load_config
from rlhf_fast.default_task import build_model
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.stages import algorithms
from rlhf_fast.stages.ppo import PPOTrainer, train_ppo
from rlhf_fast.stages.reward_fn import RewardFnError


@pytest.fixture(scope="module")
def models(task, tmp_path_factory):
    root, tok, paths = task
    d = tmp_path_factory.mktemp("algo_models")
    build_model(TINY_ARCH, tok, seed=3).save_pretrained(d / "policy")
    tok.save_pretrained(str(d / "policy"))
    ScalarHeadModel(build_model(TINY_ARCH, tok, seed=4)).save_pretrained(d / "rm")
    return d


def _trainer(models, tok, **kw):
    from transformers import AutoModelForCausalLM

    cfg = PPOConfig(sampling=SamplingConfig(max_new_tokens=6, n=4), minibatch_size=16, ppo_epochs=1,
                    optim=OptimConfig(lr=3e-3, schedule="constant"), **kw)
    policy = AutoModelForCausalLM.from_pretrained(str(models / "policy"))
    ref = AutoModelForCausalLM.from_pretrained(str(models / "policy")).requires_grad_(False)
    rm = ScalarHeadModel.from_pretrained(models / "rm").requires_grad_(False)
    return PPOTrainer(cfg, policy, None, ref, rm, tok)


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"])
def test_critic_free_update_improves_the_objective(task, models, algorithm):
    root, tok, paths = task
    trainer = _trainer(models, tok, algorithm=algorithm)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:4]]
    exp, _ = trainer.collect(prompts, 0)
    assert exp.old_values.abs().max() == 0 and trainer.value is None
    mask = exp.rollout.mask
    algo = algorithms.get(algorithm)
    if algo.estimator == "group":  # the advantages are the group estimator of score - beta * sum KL, per token
        seq = ops.token_rewards(exp.scores, exp.old_logp, exp.ref_logp, mask, kl_coef=trainer.kl_ctl.value,
                                kind=trainer.cfg.kl.kind).sum(-1)
        want = ops.group_advantages(seq, torch.tensor(exp.rollout.prompt_index), algo.group_mode,
                                    scale=algo.scale)
        torch.testing.assert_close(exp.advantages, ops.expand_advantages(want.advantages, mask))
    with torch.no_grad():
        before = trainer.minibatch_loss(exp, [])[1]
    for _ in range(6):
        stats = trainer.update(exp, 0)
    with torch.no_grad():
        after = trainer.minibatch_loss(exp, [])[1]
    assert "vf_loss" not in stats and trainer.skipped == 0
    assert after["pg_loss"] < before["pg_loss"] - 1e-4, (before, after)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "dr_grpo"])
def test_critic_free_stage_runs_without_a_value_model(task, models, tmp_path, algorithm):
    root, tok, paths = task
    cfg = PPOConfig(policy=str(models / "policy"), reward_model=str(models / "rm"), prompts=paths["ppo_prompts"],
                    algorithm=algorithm, iterations=2, prompts_per_iter=2, sampling=SamplingConfig(max_new_tokens=5,
                                                                                                   n=3),
                    minibatch_size=6, clip_high=0.28)
    res = train_ppo(cfg, tmp_path / algorithm, plots=False)
    assert res.iterations == 2 and res.value_dir is None
    assert (res.policy_dir / "config.json").is_file() and not (tmp_path / algorithm / "final" / "value").exists()
    log = rows(tmp_path / algorithm / "metrics.jsonl")
    assert len(log) == 2 and "vf_loss" not in log[0] and "pg_loss" in log[0]


def test_reward_fn_replaces_the_reward_model(task, models, tmp_path):
    root, tok, paths = task
    cfg = PPOConfig(policy=str(models / "policy"), prompts=paths["ppo_prompts"], algorithm="grpo",
                    reward_fn="_reward_fns:short_is_good", iterations=1, prompts_per_iter=2,
                    sampling=SamplingConfig(max_new_tokens=5, n=2), minibatch_size=4)
    train_ppo(cfg, tmp_path / "fn", plots=False)
    log = rows(tmp_path / "fn" / "metrics.jsonl")
    assert 0 < log[0]["score"] <= 1  # the function's scores, not an RM's


@pytest.mark.parametrize("fn, match", [("raises_on_the_third", r"KeyError: 'no answer key' on sample 2 \(prompt"),
                                       ("nan_on_the_second", r"returned nan for sample 1 \(prompt"),
                                       ("wrong_count", "returned 1 scores for 4 samples")])
def test_reward_fn_failures_stop_the_run_before_an_update(task, models, tmp_path, fn, match):
    root, tok, paths = task
    cfg = PPOConfig(policy=str(models / "policy"), reward_model=str(models / "rm"), prompts=paths["ppo_prompts"],
                    algorithm="grpo", reward_fn=f"_reward_fns:{fn}", iterations=1, prompts_per_iter=2,
                    sampling=SamplingConfig(max_new_tokens=4, n=2), minibatch_size=4)
    with pytest.raises(RewardFnError, match=match):
        train_ppo(cfg, tmp_path / fn, plots=False)
    assert not (tmp_path / fn / "final").exists()
    assert not (tmp_path / fn / "metrics.jsonl").exists() or rows(tmp_path / fn / "metrics.jsonl") == []


def test_algorithm_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="algorithm"):
        load_config(PPOConfig, overrides=["algorithm=ppo2"])
    with pytest.raises(ConfigError, match="loss_agg"):
        load_config(PPOConfig, overrides=["loss_agg=mean"])
    with pytest.raises(ConfigError, match="clip_high"):
        load_config(PPOConfig, overrides=["clip_high=-0.1"])
    with pytest.raises(ConfigError, match="reward_fn"):
        load_config(PPOConfig, overrides=["reward_fn=not_a_spec"])
    with pytest.raises(ValueError, match="reward_model"):
        train_ppo(PPOConfig(policy="p", prompts="x.jsonl", algorithm="ppo", reward_fn="_reward_fns:wrong_count"),
                  "/nonexistent/out")
    assert load_config(PPOConfig, overrides=["algorithm=dr_grpo"]).algorithm == "dr_grpo"
    agg = algorithms.loss_agg(algorithms.CONSTANT_AGG, rows=8, max_new_tokens=24)
    assert agg.num_tokens == 8 * 24 and agg.mode == "token-mean"


def test_dapo_drops_zero_std_groups_and_grpo_keeps_them():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.25])  # prompt 0: every sample scores 1 (std 0)
    logp = torch.zeros(6, 3)
    mask = torch.ones(6, 3)
    kw = dict(kl_coef=0.0, kl_kind="k1", gamma=1.0)
    adv, keep = algorithms.critic_free_advantages(algorithms.get("dapo"), scores, logp, logp, mask,
                                                  [0, 0, 0, 1, 1, 1], **kw)
    assert keep.tolist() == [False, False, False, True, True, True]
    assert (adv[:3] == 0).all() and (adv[3:, 0] != 0).all()
    _, keep = algorithms.critic_free_advantages(algorithms.get("grpo"), scores, logp, logp, mask,
                                                [0, 0, 0, 1, 1, 1], **kw)
    assert keep.all()
