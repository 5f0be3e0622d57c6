"""Routing replay end to end (tiny Qwen3-MoE and Mixtral, fp32, CPU): the engine records each sequence's experts per
input position (`Completion.routes`), equal to a teacher-forced `RoutingRecord.record()` forward of the same tokens;
PPO's packed passes replay them (`ppo.moe_routing: replay`): at unchanged weights the training log-probs are the
rollout's and the ratio is 1; under a moved router the rollout's experts are kept, the flips are reported, and the
ratio stays near 1 where recomputed routing moves it further; `train_ppo` on a tiny MoE policy logs
`moe_route_flip_frac`; dense models record nothing."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from rlhf_fast.models import build_model, from_hf, moe
from rlhf_fast.models.layers import cache_attention
from rlhf_fast.models.moe import RoutingRecord
from rlhf_fast.rollout import RolloutEngine, SamplingParams, block_table

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=7, **SMALL),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(head_dim=8, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
                                           norm_topk_prob=True, mlp_only_layers=[1], **SMALL),
}
FAMILIES = list(CONFIGS)
PROMPTS = [[1, 5, 7], list(range(9, 39)), [3] * 20, [60, 2, 44, 9, 61, 62, 63, 5, 6, 70, 71]]


def tiny(family: str):
    """Our model of `family` from a tiny random transformers model, every parameter perturbed."""
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return from_hf(hf.eval())


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny(family)
        return cache[family]
    return get


def teacher_forced_record(lm, tokens: list[int]) -> torch.Tensor:
    inputs = block_table.prefill_inputs([tokens], None, 4, torch.device("cpu"), deterministic=False, logits="all")
    rec = RoutingRecord.record()
    with torch.no_grad():
        lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, None), False, routing=rec)
    return rec.experts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_engine_routes_equal_a_teacher_forced_record(family, deterministic, models):
    lm = models(family)
    params = SamplingParams(max_new_tokens=9, temperature=0.9, n=3, seed=5)
    # a small pool: sequences are preempted and re-prefilled (their routes overwritten by position)
    eng = RolloutEngine(lm, block_size=4, num_blocks=24, max_num_seqs=6, deterministic=deterministic)
    outs = eng.generate(PROMPTS, params)
    assert eng.stats.preemptions > 0
    m, k = len(lm.moe_layers), lm.args.top_k
    for o in outs:
        toks = PROMPTS[o.prompt_index] + o.token_ids
        assert o.routes.dtype == torch.int16 and o.routes.shape == (m, len(toks) - 1, k)
        want = teacher_forced_record(lm, toks[:-1])
        got = o.routes.long()
        covered = got >= 0
        # every layer but a prefill's last computes every row; the rows it skipped are -1
        assert covered[:-1].all() and covered.all(-1).eq(covered.any(-1)).all()
        assert covered[-1, len(PROMPTS[o.prompt_index]) - 1:].all()
        same = (got.sort(-1).values == want.sort(-1).values).all(-1) | ~covered.all(-1)
        assert same.float().mean() > 0.99 and (deterministic is False or same.all())
    # the samples of one prompt share its prompt rows (one tensor, recorded once), unless re-prefilled differently
    groups = {}
    for o in outs:
        groups.setdefault(o.prompt_index, []).append(o.routes[:, :len(PROMPTS[o.prompt_index])])
    assert all(torch.equal(g[0], x) for g in groups.values() for x in g[1:]) or eng.stats.preemptions


def test_compile_on_a_routed_model_decodes_eagerly(models):
    lm = models("qwen3_moe")
    eng = RolloutEngine(lm, block_size=4, num_blocks=64, compile=True, deterministic=True)
    assert not eng.decode_step.compiled
    outs = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, seed=1))
    assert all(o.routes is not None for o in outs) and eng.stats.compilations == 0


def test_a_dense_model_records_no_routes():
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)).eval()
    outs = RolloutEngine(from_hf(hf), block_size=4, num_blocks=64).generate(PROMPTS, SamplingParams(max_new_tokens=4,
                                                                                                      seed=1))
    assert all(o.routes is None for o in outs)


# ------------------------------------------------------------------ PPO's passes
def _rollout(lm, deterministic=True, seed=3):
    from rlhf_fast.stages import experience as xp

    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=seed)
    outs = RolloutEngine(lm, block_size=4, num_blocks=64, deterministic=deterministic).generate(PROMPTS, params)
    return outs, xp.make_rollout(PROMPTS, outs, 0)


def _moved(lm):
    """A copy of `lm` whose routers moved (noise of 0.6 std): some tokens' top-k flips."""
    moved = build_model(lm.config)
    moved.load_state_dict(lm.state_dict())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in moved.moe_layers:
            w = moved.layers[i].mlp.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * 0.6 * w.std())
    return moved


def _policy_stats(lm, outs, ro, mode, old=None):
    """The update's policy loss stats on the whole rollout against `old` log-probs (default: the rollout's own,
    old_logp=reuse)."""
    from types import SimpleNamespace

    from rlhf_fast.config import PPOConfig, SamplingConfig
    from rlhf_fast.stages.kl_control import KLController
    from rlhf_fast.stages import algorithms
    from rlhf_fast.stages import experience as xp
    from rlhf_fast.stages import packed_passes as pp
    from rlhf_fast.stages.ppo import PPOTrainer

    cfg = PPOConfig(sampling=SamplingConfig(max_new_tokens=8, n=2), moe_routing=mode, algorithm="grpo")
    old = pp.rollout_logprobs(outs, ro) if old is None else old
    adv = torch.randn(ro.mask.shape, generator=torch.Generator().manual_seed(0)) * ro.mask
    exp = xp.Experience(ro, old, old, torch.zeros_like(old), torch.zeros(len(outs)), adv, adv,
                        torch.zeros(len(outs)), torch.ones(len(outs), dtype=torch.bool))
    me = SimpleNamespace(cfg=cfg, policy=lm, kl_ctl=KLController(cfg.kl), algo=algorithms.get("grpo"),
                         correction=lambda mb: {})
    loss, stats = PPOTrainer.policy_loss(me, exp)
    return loss, stats


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_at_unchanged_weights_gives_the_rollout_logprobs_and_ratio_one(family, models):
    from rlhf_fast.stages import packed_passes as pp

    lm = models(family)
    outs, ro = _rollout(lm)
    assert ro.routes is not None and len(ro.routes) == len(outs)
    sub = ro.select(torch.tensor([5, 0, 3]))  # the routes follow the rows
    assert [r.shape for r in sub.routes] == [ro.routes[i].shape for i in (5, 0, 3)]
    roll = pp.rollout_logprobs(outs, ro)
    for share in (True, False):
        batch = pp.pack_rollout(ro, share)
        rec = pp.routing_for(lm, ro, batch, "replay")
        assert rec.replaying
        with torch.no_grad():
            lp = pp.policy_logprobs(lm, ro, 1.0, batch=batch, routing=rec)
        torch.testing.assert_close(lp * ro.mask, roll * ro.mask, atol=2e-6, rtol=0)
        assert pp.route_flips(rec, ro, batch) == 0.0
    loss, st = _policy_stats(lm, outs, ro, "replay")
    assert torch.isfinite(loss) and st["clip_frac"] == 0.0 and abs(st["approx_kl"]) < 1e-10
    assert st["moe_route_flip_frac"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_with_recomputed_old_logp_gives_a_ratio_of_exactly_one(family, models):
    """old_logp=recompute under replay: the scoring pass and the update run the same forward on the rollout's
    experts, so at unchanged weights every ratio is exactly 1 (approx KL exactly 0), even after the router moved."""
    from rlhf_fast.stages import packed_passes as pp

    lm = models(family)
    outs, ro = _rollout(lm, deterministic=False)
    moved = _moved(lm)  # a router the rollout did not use: replay keeps the rollout's experts anyway
    batch = pp.pack_rollout(ro, True)
    with torch.no_grad():
        old = pp.policy_logprobs(moved, ro, 1.0, batch=batch, routing=pp.routing_for(moved, ro, batch, "replay"))
    _, st = _policy_stats(moved, outs, ro, "replay", old=old)
    assert st["approx_kl"] == 0.0 and st["clip_frac"] == 0.0 and st["moe_route_flip_frac"] > 0
    _, off = _policy_stats(moved, outs, ro, "recompute", old=old)  # the moved router's own experts
    assert off["approx_kl"] != 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_keeps_the_rollout_experts_under_a_moved_router(family, models):
    lm = models(family)
    outs, ro = _rollout(lm)
    moved = _moved(lm)
    _, rep = _policy_stats(moved, outs, ro, "replay")
    _, rec = _policy_stats(moved, outs, ro, "recompute")
    # flips reported either way (past the first MoE layer they differ: recomputed routing changes later inputs)
    assert rep["moe_route_flip_frac"] > 0 and rec["moe_route_flip_frac"] > 0
    assert torch.isfinite(torch.tensor(rep["approx_kl"])) and rep["approx_kl"] < rec["approx_kl"]


def test_dense_policy_passes_take_no_routing():
    from rlhf_fast.stages import packed_passes as pp

    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)).eval()
    lm = from_hf(hf)
    outs, ro = _rollout(lm, deterministic=False)
    assert ro.routes is None
    batch = pp.pack_rollout(ro, True)
    assert pp.routing_for(lm, ro, batch, "replay") is None and pp.route_flips(None, ro, batch) is None
    _, st = _policy_stats(lm, outs, ro, "replay")
    assert "moe_route_flip_frac" not in st


def test_train_ppo_on_a_moe_policy_logs_the_route_flips(task, tmp_path):
    from _tiny import rows

    from rlhf_fast.config import PPOConfig, SamplingConfig
    from rlhf_fast.stages.ppo import train_ppo

    root, tok, paths = task
    cfg = tf.Qwen3MoeConfig(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                            norm_topk_prob=True, **{**SMALL, "vocab_size": len(tok),
                                                    "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(str(tmp_path / "policy"))
    ppo = PPOConfig(policy=str(tmp_path / "policy"), prompts=paths["ppo_prompts"], algorithm="grpo",
                    reward_fn="_reward_fns:short_is_good", iterations=2, prompts_per_iter=2,
                    sampling=SamplingConfig(max_new_tokens=5, n=2), minibatch_size=2, router_aux_coef=0.01)
    train_ppo(ppo, tmp_path / "run", plots=False)
    log = rows(tmp_path / "run" / "metrics.jsonl")
    assert len(log) == 2 and all(0 <= r["moe_route_flip_frac"] <= 1 for r in log)
    assert all(r["router_aux_loss"] > 0 for r in log)


def test_moe_routing_is_validated():
    from rlhf_fast.config import ConfigError, PPOConfig

    with pytest.raises(ConfigError, match="moe_routing"):
        PPOConfig(moe_routing="sometimes")
