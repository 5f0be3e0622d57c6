"""The verl plug-in against verl's own installed code (tests/_peers.py): same loss, gradients and metrics as
`compute_policy_loss_vanilla` / `compute_policy_loss_gspo` under `agg_loss` in every mode and normaliser, same
advantages as verl's estimators, same log-probs/entropy and gradients as verl's `FusedLinearForPPO`, and the
`verl.plugins` entry point loaded by `import verl` itself."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import _peers

REPO = Path(__file__).resolve().parents[1]
AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module", params=_peers.versions("verl"))
def verl_mods(request):
    with _peers.plugin("verl", request.param) as plugin:
        from verl.trainer.ppo import core_algos
        from verl.workers.config.actor import ActorConfig

        plugin.register()
        yield core_algos, ActorConfig, plugin


def _batch(b=6, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logp = old + 0.4 * torch.randn(b, t, generator=g)  # ratios on both sides of the clip range
    adv = torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.75).float()
    mask[1] = 0  # an empty row
    logp[0, :3], adv[0, :3], mask[0, :3] = old[0, :3] + 1.5, -1.0, 1.0  # A < 0 with a ratio above clip_ratio_c
    w = torch.rand(b, t, generator=g) * 2
    return logp, old, adv, mask, w


def _run(fn, logp, old, adv, mask, mode, cfg, w):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=cfg, rollout_is_weights=w)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("peer_fn,ours", [("compute_policy_loss_vanilla", "rlhf_fast"),
                                          ("compute_policy_loss_gspo", "rlhf_fast_gspo")])
def test_policy_loss_matches_verl(verl_mods, peer_fn, ours):
    core_algos, ActorConfig, _ = verl_mods
    theirs, mine = getattr(core_algos, peer_fn), core_algos.get_policy_loss_fn(ours)
    logp, old, adv, mask, w = _batch()
    infos = ({}, {"dp_size": 2, "batch_num_tokens": 71, "global_batch_size": 9, "loss_scale_factor": 16})
    for mode in AGG:
        for info in infos:
            for weights in (None, w):
                cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                                  clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5, loss_agg_mode=mode)
                cfg.global_batch_info.update(info)
                ref_loss, ref_grad, ref_m = _run(theirs, logp, old, adv, mask, mode, cfg, weights)
                loss, grad, m = _run(mine, logp, old, adv, mask, mode, cfg, weights)
                where = f"{mode} {info} weights={weights is not None}"
                torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-7, msg=where)
                torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7, msg=where)
                assert m.keys() == ref_m.keys()
                for k in m:
                    assert m[k] == pytest.approx(ref_m[k], abs=1e-6), (where, k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_at_masked_positions(verl_mods, bad):
    """NaN / Inf where the response mask is 0, in old_log_prob, log_prob, advantages or rollout_is_weights: our
    loss, gradient and metrics equal verl's on the same batch with finite values there, in every mode (for vanilla
    also verl's own on the dirty batch: its `masked_sum` selects; its GSPO ratio multiplies, NaN * 0 = NaN)."""
    core_algos, ActorConfig, _ = verl_mods
    logp, old, adv, mask, w = _batch(seed=3)
    off = mask == 0
    for peer_fn, ours in (("compute_policy_loss_vanilla", "rlhf_fast"), ("compute_policy_loss_gspo", "rlhf_fast_gspo")):
        theirs, mine = getattr(core_algos, peer_fn), core_algos.get_policy_loss_fn(ours)
        for mode in AGG:
            cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                              clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5, loss_agg_mode=mode)
            ref_loss, ref_grad, ref_m = _run(theirs, logp, old, adv, mask, mode, cfg, w)
            for i, name in enumerate(("log_prob", "old_log_prob", "advantages", "rollout_is_weights")):
                dirty = [logp, old, adv, w]
                dirty[i] = dirty[i].masked_fill(off, bad)
                loss, grad, m = _run(mine, *dirty[:3], mask, mode, cfg, dirty[3])
                where = f"{ours} {mode} {name}={bad}"
                assert all(np.isfinite(v) for v in m.values()), (where, m)
                torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-7, msg=where)
                torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7, msg=where)
                for k in ref_m:
                    assert m[k] == pytest.approx(ref_m[k], abs=1e-6), (where, k)
                if peer_fn == "compute_policy_loss_vanilla":
                    _, _, peer_m = _run(theirs, *dirty[:3], mask, mode, cfg, dirty[3])
                    for k in ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
                        assert m[k] == pytest.approx(peer_m[k], abs=1e-6), (where, k)


def test_advantage_estimators_match_verl(verl_mods):
    core_algos, _, _ = verl_mods
    g = torch.Generator().manual_seed(1)
    b, t = 13, 7
    mask = (torch.rand(b, t, generator=g) < 0.8).float()
    mask[:, 0] = 1
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), t - 1] = torch.randn(b, generator=g)  # verl sums the row: score anywhere
    # non-contiguous string uids, groups of 4, 3, 5 and a singleton, as verl's shuffled batches have
    uid = np.array(["c", "a", "b", "a", "c", "b", "a", "c", "b", "a", "c", "z", "c"], dtype=object)
    cases = [("rlhf_fast_grpo", core_algos.compute_grpo_outcome_advantage, {}),
             ("rlhf_fast_grpo", core_algos.compute_grpo_outcome_advantage, {"norm_adv_by_std_in_grpo": False}),
             ("rlhf_fast_rloo", core_algos.compute_rloo_outcome_advantage, {}),
             ("rlhf_fast_reinforce_pp_baseline",
              core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage, {})]
    for name, peer, kw in cases:
        ref_adv, ref_ret = peer(token_level_rewards=rewards.clone(), response_mask=mask, index=uid, **kw)
        adv, ret = core_algos.get_adv_estimator_fn(name)(token_level_rewards=rewards.clone(), response_mask=mask,
                                                         index=uid, **kw)
        torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-6, msg=f"{name} {kw}")
        torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-6, msg=f"{name} {kw}")


def test_fused_linear_matches_verl_and_routes_their_forward(verl_mods):
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend
    from verl.utils.experimental import torch_functional as tf

    _, _, plugin = verl_mods
    original = tf.FusedLinearForPPO
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 9, 32, generator=g, dtype=torch.float32)
    wt = torch.randn(97, 32, generator=g) * 0.3
    ids = torch.randint(0, 97, (3, 9), generator=g)
    gl, ge = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    outs = []
    for cls in (original, plugin.FusedLinearForPPO):
        hh, ww = h.clone().requires_grad_(True), wt.clone().requires_grad_(True)
        logp, ent = cls(chunk_size=5)(hh, ww, ids, temperature=0.7)
        ((logp * gl).sum() + (ent * ge).sum()).backward()
        outs.append((logp.detach(), ent.detach(), hh.grad, ww.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)

    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    x = torch.randint(0, 97, (2, 8), generator=g)
    plugin.patch_fused_linear()
    try:
        assert tf.FusedLinearForPPO is plugin.FusedLinearForPPO
        out = forward_with_torch_backend(model, input_ids=x, return_dict=True, temperature=1.0)
    finally:
        plugin.unpatch_fused_linear()
    assert tf.FusedLinearForPPO is original
    ref = forward_with_torch_backend(model, input_ids=x, return_dict=True, temperature=1.0)
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=2e-6)


def test_broken_plugin_fails_loudly(verl_mods, monkeypatch, caplog):
    core_algos, _, plugin = verl_mods

    def broken():
        raise ImportError("simulated: rlhf_fast._C is missing")

    monkeypatch.setattr(plugin, "register", broken)
    with pytest.warns(RuntimeWarning, match="plug-in failed"), pytest.raises(ImportError, match="simulated"):
        plugin.load_plugin()
    assert "rlhf_fast verl plug-in failed" in caplog.text
    with pytest.raises(RuntimeError, match="failed to load.*simulated"):
        core_algos.get_policy_loss_fn("rlhf_fast")()
    with pytest.raises(RuntimeError, match="failed to load.*simulated"):
        core_algos.get_adv_estimator_fn("rlhf_fast_grpo")()
    monkeypatch.undo()
    plugin.register()  # the real functions replace the failure markers
    assert core_algos.get_policy_loss_fn("rlhf_fast") is plugin.policy_loss


@pytest.mark.slow
def test_entry_point_is_loaded_by_import_verl(verl_mods, tmp_path):
    """`import verl` in a fresh process discovers our `verl.plugins` entry point from package metadata (as
    pyproject.toml declares it for an installed rlhf_fast) and the names resolve through verl's registries; the
    older `VERL_USE_EXTERNAL_MODULES` route goes through verl's own `import_external_libs`."""
    dist = tmp_path / "rlhf_fast_plugin_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rlhf_fast_plugin_probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\nrlhf_fast = rlhf_fast.integrations.verl_plugin\n")
    code = textwrap.dedent("""
        import verl
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
        from rlhf_fast.integrations import verl as plugin
        assert get_policy_loss_fn("rlhf_fast") is plugin.policy_loss
        assert get_adv_estimator_fn("rlhf_fast_grpo") is plugin.ESTIMATORS["rlhf_fast_grpo"]
        from verl.utils.experimental import torch_functional as tf
        assert tf.FusedLinearForPPO is plugin.FusedLinearForPPO
        print("ok")
    """)
    path = os.pathsep.join([str(tmp_path), str(REPO), *[p for p in sys.path if p]])
    env = dict(os.environ, PYTHONPATH=path, RLHF_FAST_VERL_FUSED_LINEAR="1", VERL_USE_EXTERNAL_PLUGINS="auto")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

    from verl.utils.import_utils import import_external_libs

    sys.modules.pop("rlhf_fast.integrations.verl_plugin", None)
    core_algos, _, plugin = verl_mods
    core_algos.POLICY_LOSS_REGISTRY.pop("rlhf_fast")
    import_external_libs(["rlhf_fast.integrations.verl_plugin"])
    assert core_algos.get_policy_loss_fn("rlhf_fast") is plugin.policy_loss


def test_tested_release_is_declared(verl_mods):
    _peers.assert_declared(verl_mods[2], "verl")


def test_other_releases_are_refused(verl_mods, monkeypatch):
    """On a verl release outside SUPPORTED_VERSIONS (the version the check reads is patched, verl's code is not):
    register() and patch_fused_linear() raise, naming both; the entry point warns and marks our names, so choosing
    one raises the same error; RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1 lets them run."""
    core_algos, _, plugin = verl_mods

    def patch_and_undo():
        plugin.patch_fused_linear()
        plugin.unpatch_fused_linear()

    _peers.assert_refuses(monkeypatch, plugin, "verl", plugin.register, patch_and_undo)
    monkeypatch.delenv(plugin._versions.ALLOW_ENV)
    with pytest.warns(RuntimeWarning, match="plug-in failed"), \
            pytest.raises(plugin._versions.UnsupportedPeerVersion, match="0.0.1"):
        plugin.load_plugin()
    with pytest.raises(RuntimeError, match="failed to load.*installed verl is 0.0.1"):
        core_algos.get_policy_loss_fn("rlhf_fast")()
    monkeypatch.undo()
    plugin.register()
    assert core_algos.get_policy_loss_fn("rlhf_fast") is plugin.policy_loss
