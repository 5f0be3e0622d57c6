"""Each stage on a tiny random model for a few steps, the ranking pairs, the NaN guard, the KL controller."""
import json
import math

import pytest
import torch
from _tiny import TINY_ARCH, one_thread, tiny_sft_config, tiny_task

from rlhf_fast.config import KLConfig, OptimConfig, PPOConfig, RMConfig
from rlhf_fast.data import RankedExample
from rlhf_fast.default_task import build_model, labeler
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.stages import experience as xp
from rlhf_fast.stages.common import guarded_step, lr_factor, make_optimizer, make_scheduler
from rlhf_fast.stages.kl_control import KLController
from rlhf_fast.stages.ppo import PPOTrainer, train_ppo
from rlhf_fast.stages.rm import bradley_terry_loss, ranked_batch, train_rm
from rlhf_fast.stages.sft import train_sft


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    with one_thread():
        yield (root, *tiny_task(root))


def rows(path):
    return [json.loads(line) for line in open(path)]


def test_sft_loss_decreases_on_a_fixed_batch(task, tmp_path):
    root, tok, paths = task
    one_batch = tmp_path / "one.jsonl"
    one_batch.write_text("".join(json.dumps(r) + "\n" for r in rows(paths["sft_train"])[:8]))
    cfg = tiny_sft_config(root, paths, train_data=str(one_batch), epochs=12,
                          optim=OptimConfig(lr=1e-2, schedule="constant"))
    res = train_sft(cfg, tmp_path / "sft")
    losses = [r["loss"] for r in rows(tmp_path / "sft" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12 and res.steps == 12 and res.skipped_steps == 0
    assert losses[-1] < 0.5 * losses[0]
    assert math.isfinite(res.eval_loss)
    assert (tmp_path / "sft" / "sft_curves.png").is_file() and (res.model_dir / "config.json").is_file()


def test_ranked_pairs_skip_ties_and_normalise_per_prompt():
    ex = [RankedExample([5], [[1], [2], [3]], [0, 1, 1]),  # 2 pairs (the tie gives none)
          RankedExample([5], [[1], [2]], [1, 0])]  # 1 pair, the second completion preferred
    b = ranked_batch(ex, pad_id=0)
    assert b.input_ids.shape == (5, 2)
    assert sorted(zip(b.better.tolist(), b.worse.tolist())) == [(0, 1), (0, 2), (4, 3)]
    torch.testing.assert_close(b.weight, torch.tensor([0.25, 0.25, 0.5]))
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 3.0])
    loss, margin = bradley_terry_loss(scores, b)
    sp = torch.nn.functional.softplus  # -log sigmoid(m) = softplus(-m)
    expected = 0.5 * (sp(torch.tensor(-1.0)) + sp(torch.tensor(-2.0))) / 2 * 2 / 2 + 0.5 * sp(torch.tensor(-3.0))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(margin, torch.tensor([1.0, 2.0, 3.0]))


def test_rm_learns_a_planted_preference(task, tmp_path):
    """Chosen completions are concise, rejected ones padded with filler: the RM must learn it."""
    root, tok, paths = task
    sft = train_sft(tiny_sft_config(root, paths, epochs=1), tmp_path / "sft", plots=False)

    def write(name, n, seed):
        g = __import__("random").Random(seed)
        with open(tmp_path / name, "w") as f:
            for _ in range(n):
                p = labeler.random_problem(g, 2, 3)
                ans = " ".join(labeler.answer(p))
                f.write(json.dumps({"prompt": labeler.prompt_text(p), "chosen": ans,
                                    "rejected": "ok , the result is : " + ans}) + "\n")
        return str(tmp_path / name)

    cfg = RMConfig(model=str(sft.model_dir), train_data=write("tr.jsonl", 96, 1), eval_data=write("ev.jsonl", 32, 2),
                   batch_size=16, epochs=2, optim=OptimConfig(lr=3e-3))
    res = train_rm(cfg, tmp_path / "rm", plots=False)
    assert res.accuracy >= 0.9
    head = ScalarHeadModel.from_pretrained(res.model_dir)
    assert head.head.weight.shape == (1, TINY_ARCH.hidden_size)


def test_nan_guard_never_touches_the_weights():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model.parameters(), OptimConfig(lr=0.1))
    sched = make_scheduler(opt, OptimConfig(lr=0.1), 10)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    x = torch.randn(4, 3)
    res = guarded_step(model(x).sum() * float("nan"), [params], opt, sched, 1.0)  # NaN loss
    assert not res.applied
    res = guarded_step(model(x * float("inf")).sum(), [params], opt, sched, 1.0)  # Inf gradient
    assert not res.applied and not math.isfinite(res.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state == {} or all(not s for s in opt.state.values())
    assert all(p.grad is None for p in params)
    res = guarded_step(model(x).sum(), [params], opt, sched, 1.0)  # a finite step goes through
    assert res.applied and not torch.equal(before[0], model.weight)


def test_lr_schedule_warmup_then_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 20) == 0.25 and lr_factor(3, cfg, 20) == 1.0
    assert lr_factor(20, cfg, 20) == pytest.approx(0.1)
    assert lr_factor(12, cfg, 20) == pytest.approx(0.55)


def test_kl_controller():
    fixed = KLController(KLConfig(coef=0.1))
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ada = KLController(KLConfig(coef=0.1, target=1.0, horizon=100))
    ada.update(5.0, 10)  # KL far above target: beta grows by at most 20% * 10/100
    assert ada.value == pytest.approx(0.1 * 1.02)
    ada.update(0.5, 10)
    assert ada.value == pytest.approx(0.1 * 1.02 * 0.98)  # error clipped to -0.2
    back = KLController(KLConfig(coef=0.1, target=1.0))
    back.load_state_dict(ada.state_dict())
    assert back.value == ada.value


@pytest.fixture(scope="module")
def ppo_models(task, tmp_path_factory):
    root, tok, paths = task
    d = tmp_path_factory.mktemp("ppo_models")
    policy = build_model(TINY_ARCH, tok, seed=3)
    policy.save_pretrained(d / "policy")
    tok.save_pretrained(str(d / "policy"))
    ScalarHeadModel(build_model(TINY_ARCH, tok, seed=4)).save_pretrained(d / "rm")
    return d


@pytest.mark.parametrize("placement, generator", [("reward", "engine"), ("loss", "hf")])
def test_ppo_update_improves_the_objective_on_a_fixed_batch(task, ppo_models, placement, generator):
    root, tok, paths = task
    cfg = PPOConfig(max_new_tokens=6, n_samples=2, minibatch_size=16, ppo_epochs=1, ptx_coef=0.1,
                    optim=OptimConfig(lr=1e-3, schedule="constant"), entropy_coef=0.01, generator=generator,
                    kl=KLConfig(coef=0.1, placement=placement))
    from transformers import AutoModelForCausalLM
    policy = AutoModelForCausalLM.from_pretrained(str(ppo_models / "policy"))
    value = ScalarHeadModel.from_pretrained(ppo_models / "rm")
    ref = AutoModelForCausalLM.from_pretrained(str(ppo_models / "policy")).requires_grad_(False)
    rm = ScalarHeadModel.from_pretrained(ppo_models / "rm").requires_grad_(False)
    ptx = [tok(r["text"])["input_ids"] for r in rows(paths["ptx"])[:8]]
    trainer = PPOTrainer(cfg, policy, value, ref, rm, tok, ptx)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:8]]
    exp, times = trainer.collect(prompts, 0)
    assert exp.rollout.input_ids.shape[0] == 16 and set(times) >= {"time_generate", "time_score"}
    # fresh samples: the recomputed log-probs are the policy's, so the first ratio is 1 and the KL to ref is 0
    assert torch.allclose(exp.old_logp, exp.ref_logp) and float(exp.kl.abs().max()) == 0.0
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
    from transformers import AutoModelForCausalLM

    from rlhf_fast.rollout import RolloutEngine, SamplingParams
    policy = AutoModelForCausalLM.from_pretrained(str(ppo_models / "policy")).eval()
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:5]]
    comps = RolloutEngine(policy).generate(prompts, SamplingParams(max_new_tokens=5, n=2, seed=1))
    ro = xp.make_rollout(prompts, comps, tok.pad_token_id)
    with torch.no_grad():
        logp = xp.policy_logprobs(policy, ro, 1.0)
    for i, c in enumerate(comps):
        torch.testing.assert_close(logp[i, : len(c.token_ids)], c.logprobs, atol=1e-4, rtol=0)
        assert ro.mask[i].sum() == len(c.token_ids)


def test_ppo_stage_runs_and_resumes_exactly(task, ppo_models, tmp_path):
    root, tok, paths = task
    cfg = PPOConfig(policy=str(ppo_models / "policy"), reward_model=str(ppo_models / "rm"),
                    prompts=paths["ppo_prompts"], iterations=2, prompts_per_iter=4, n_samples=2, max_new_tokens=5,
                    minibatch_size=4, kl=KLConfig(target=1.0, coef=0.1))
    full = train_ppo(cfg, tmp_path / "full", plots=False)
    train_ppo(cfg, tmp_path / "part", stop_after=1)
    resumed = train_ppo(cfg, tmp_path / "part", plots=False)
    assert full.iterations == resumed.iterations == 2
    from transformers import AutoModelForCausalLM
    for load, da, db in ((ScalarHeadModel.from_pretrained, full.value_dir, resumed.value_dir),
                         (AutoModelForCausalLM.from_pretrained, full.policy_dir, resumed.policy_dir)):
        a, b = load(da).state_dict(), load(db).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    log = rows(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and log[-1]["kl_coef"] != 0.1  # the adaptive KL moved
    untimed = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in log]
    assert [{k: v for k, v in r.items() if not k.startswith("time_")}
            for r in rows(tmp_path / "part" / "metrics.jsonl")] == untimed


def test_labeler_prefers_correct_then_short():
    p = labeler.prompt_text(labeler.Problem("reverse", ("c", "a", "b")))
    assert labeler.judge(p, "b a c") == labeler.Judgement(True, 3)
    assert labeler.judge(p, "sure , here is the answer : b a c . done").correct
    assert not labeler.judge(p, "b c a").correct
    assert labeler.rank(p, ["b a c . done", "b a c", "a b c", "c a b"]) == [1, 0, 2, 2]
    assert labeler.compare(p, "b a c", "ok , the result is : b a c") == 1.0
    assert labeler.compare(p, "b c", "b a c . done") == 0.0
    assert labeler.compare(p, "a", "c") == 0.5
    with pytest.raises(ValueError, match="not a prompt"):
        labeler.parse_prompt("user : juggle a b assistant :")


def test_ppo_early_stop_on_approx_kl(task, ppo_models):
    root, tok, paths = task
    from transformers import AutoModelForCausalLM
    cfg = PPOConfig(max_new_tokens=4, n_samples=2, minibatch_size=4, ppo_epochs=3, early_stop_kl=1e-12,
                    optim=OptimConfig(lr=1e-3, schedule="constant"))
    policy = AutoModelForCausalLM.from_pretrained(str(ppo_models / "policy"))
    ref = AutoModelForCausalLM.from_pretrained(str(ppo_models / "policy")).requires_grad_(False)
    value, rm = (ScalarHeadModel.from_pretrained(ppo_models / "rm") for _ in range(2))
    trainer = PPOTrainer(cfg, policy, value, ref, rm.requires_grad_(False), tok)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:8]]
    exp, _ = trainer.collect(prompts, 0)
    stats = trainer.update(exp, 0)
    # the first minibatch is on-policy (approx KL exactly 0); after one step the second one exceeds the limit
    assert stats["early_stopped"] == 1.0
    steps = {int(s["step"]) for s in trainer.opt.state.values()}
    assert steps == {2}  # instead of 3 epochs x 4 minibatches
