"""PPO on padding-free batches: the same losses and gradients as the padded Hugging Face forward (the oracle:
`_oracle.hf_twin`), shared prompts or per sample, reused vs recomputed old_logp; value/reward models without an
lm_head."""
import pytest
import torch
from _oracle import hf_twin, padded_logprobs, padded_scores, padded_values, twin_grads
from _tiny import TINY_ARCH, rows

from rlhf_fast import ops
from rlhf_fast.config import KLConfig, OptimConfig, PPOConfig, SamplingConfig
from rlhf_fast.default_task import build_model
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.stages import packed_passes as pp
from rlhf_fast.stages.ppo import PPOTrainer

ARCH = TINY_ARCH.__class__(**{**TINY_ARCH.__dict__, "num_layers": 2})


@pytest.fixture(scope="module")
def setup(task):
    root, tok, paths = task
    policy = build_model(ARCH, tok, seed=3)
    ref = build_model(ARCH, tok, seed=5).requires_grad_(False)  # differs from the policy: a non-zero KL
    value = ScalarHeadModel(build_model(ARCH, tok, seed=4))
    rm = ScalarHeadModel(build_model(ARCH, tok, seed=6)).requires_grad_(False)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows(paths["ppo_prompts"])[:6]]
    return tok, (policy, value, ref, rm), prompts


def config(**kw) -> PPOConfig:
    return PPOConfig(**{**dict(sampling=SamplingConfig(max_new_tokens=7, n=3), minibatch_size=18, ppo_epochs=1,
                               entropy_coef=0.01, kl=KLConfig(coef=0.1, placement="loss"),
                               optim=OptimConfig(lr=1e-3, schedule="constant")), **kw})


def loss_and_grads(cfg, tok, models, exp):
    trainer = PPOTrainer(cfg, *models, tok)
    for m in models[:2]:
        m.eval().zero_grad(set_to_none=True)  # no dropout on either path
    loss, stats = trainer.minibatch_loss(exp, [])
    loss.backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(models[:2]) for n, p in m.named_parameters()
             if p.grad is not None}
    return float(loss.detach()), stats, grads


@pytest.fixture(scope="module")
def experience(setup):
    tok, models, prompts = setup
    trainer = PPOTrainer(config(old_logp="recompute"), *models, tok)
    exp, _ = trainer.collect(prompts, 0)
    assert len(set(exp.rollout.mask.sum(1).tolist())) > 1  # responses of several lengths (padding to remove)
    return exp


def oracle_loss_and_grads(cfg, models, exp):
    """The minibatch loss of `config()` (clipped policy loss + KL in the loss - entropy bonus + value loss) on the
    padded HF forwards of the policy's and value model's twins, and the twins' gradients under our names."""
    policy, value = models[:2]
    p_twin, v_twin = hf_twin(policy), hf_twin(value)
    ro = exp.rollout
    h = p_twin.base_model(input_ids=ro.input_ids, use_cache=False).last_hidden_state
    h = h.gather(1, ro.positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (N, R, H)
    loss, st = ops.ppo_loss_from_hidden(
        h, p_twin.lm_head.weight, ro.labels.clamp(min=0), exp.old_logp, exp.advantages, ro.mask,
        clip=ops.PPOClip(low=cfg.clip, high=cfg.clip), agg="token-mean",
        kl=ops.KLTerm(exp.ref_logp, cfg.kl.coef, cfg.kl.kind), entropy_coef=cfg.entropy_coef)
    vpred = padded_values(v_twin, ro.input_ids).gather(1, ro.positions)
    vl, _ = ops.value_loss(vpred, exp.old_values, exp.returns, ro.mask, clip=cfg.value_clip, agg="token-mean")
    loss = loss + cfg.vf_coef * vl
    loss.backward()
    grads = {f"0.{k}": g for k, g in twin_grads(policy, p_twin).items()}
    grads.update({f"1.lm.{k}": g for k, g in twin_grads(value, v_twin).items()})
    grads.update({f"1.head.{k}": p.grad for k, p in v_twin[1].named_parameters()})
    return float(loss.detach()), {"pg_loss": float(st.policy_loss), "entropy": float(st.entropy),
                                  "vf_loss": float(vl.detach())}, grads


@pytest.mark.parametrize("share", [False, True])
def test_packed_update_matches_padded_hf(setup, experience, share):
    tok, models, _ = setup
    ref_loss, ref_stats, ref_grads = oracle_loss_and_grads(config(), models, experience)
    loss, stats, grads = loss_and_grads(config(share_prompts=share), tok, models, experience)
    assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    for k in ("pg_loss", "vf_loss", "entropy"):
        assert stats[k] == pytest.approx(ref_stats[k], abs=1e-5, rel=1e-5), k
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("share", [False, True])
def test_packed_scoring_matches_padded_hf(setup, experience, share):
    tok, (policy, value, ref, rm), _ = setup
    ro = experience.rollout
    ours, _ = pp.score_rollout(config(share_prompts=share, old_logp="recompute"), policy, ref, value, rm, ro, None)
    with torch.no_grad():
        oracle = (padded_logprobs(hf_twin(policy), ro.input_ids, ro.positions, ro.labels),
                  padded_logprobs(hf_twin(ref), ro.input_ids, ro.positions, ro.labels),
                  padded_values(hf_twin(value), ro.input_ids).gather(1, ro.positions) * ro.mask,
                  padded_scores(hf_twin(rm), ro.input_ids, ro.lengths))
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reused_old_logp_equals_recomputed(setup):
    tok, models, prompts = setup
    trainer = PPOTrainer(config(old_logp="check"), *models, tok)
    exp, metrics = trainer.collect(prompts, 1)
    assert 0 <= metrics["old_logp_max_diff"] <= 1e-6  # the engine's log-probs vs the packed training forward
    recomputed, _ = PPOTrainer(config(old_logp="recompute"), *models, tok).collect(prompts, 1)
    torch.testing.assert_close(exp.old_logp, recomputed.old_logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.advantages, recomputed.advantages, atol=1e-4, rtol=1e-4)
    a = loss_and_grads(config(), tok, models, exp)
    b = loss_and_grads(config(), tok, models, recomputed)
    assert a[0] == pytest.approx(b[0], abs=1e-4)


def test_epoch_order_keeps_prompt_groups_together():
    g = torch.Generator().manual_seed(0)
    index = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    order = pp.epoch_order(config(), index, g).tolist()
    assert sorted(order) == list(range(12))
    assert all(len({index[i] for i in order[k:k + 3]}) == 1 for k in range(0, 12, 3))
    assert sorted(pp.epoch_order(config(share_prompts=False), index, g).tolist()) == list(range(12))


def test_scalar_head_model_has_no_lm_head_and_stays_loadable(setup, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf_fast.models.packed import pack

    tok, (policy, value, ref, rm), _ = setup
    assert value.lm.lm_head is None
    n_backbone = sum(p.numel() for p in value.lm.parameters())
    assert sum(p.numel() for p in value.parameters()) == n_backbone + ARCH.hidden_size + 1
    value.save_pretrained(tmp_path / "v")
    back = ScalarHeadModel.from_pretrained(tmp_path / "v")
    batch = pack([[5, 6]], [[7, 8]])
    torch.testing.assert_close(back(batch), value(batch))
    backbone = AutoModel.from_pretrained(str(tmp_path / "v"))
    torch.testing.assert_close(backbone.get_input_embeddings().weight, value.lm.embed.weight)
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "v"))  # a causal LM with a fresh / tied lm_head
    torch.testing.assert_close(lm.model.layers[0].mlp.up_proj.weight, value.lm.layers[0].mlp.up_proj.weight)


def test_config_checks():
    from rlhf_fast.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="train_model: removed"):
        from_dict(PPOConfig, {"train_model": "hf"})
    with pytest.raises(Exception, match="old_logp"):
        config(old_logp="maybe")
