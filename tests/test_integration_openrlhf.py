"""The OpenRLHF plug-in against OpenRLHF's own installed `openrlhf/models/loss.py` (tests/_peers.py): the same
loss, gradients and returned statistics as its `PolicyLoss` / `ValueLoss` on random masked batches, in every
policy_loss_type / aggregation / normaliser / clip setting they take; `patch()` swaps the classes where OpenRLHF
looks them up and `unpatch()` restores them."""
import pytest
import torch

import _peers


@pytest.fixture(scope="module", params=_peers.versions("openrlhf"))
def mods(request):
    peer = _peers.load_openrlhf_loss(request.param)
    with _peers.plugin("openrlhf", request.param, forget_after=True) as plugin:
        yield peer, plugin


def _batch(b=6, t=12, seed=0, row_constant_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logp = old + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, t).clone() if row_constant_adv else torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.75).float()
    mask[:, 0] = 1  # OpenRLHF divides by each row's token count without a guard in its per-sample mode
    if not row_constant_adv:
        logp[0, :3], adv[0, :3], mask[0, :3] = old[0, :3] + 1.5, -1.0, 1.0  # A < 0, ratio above the dual clip
    return logp, old, adv, mask


NORMS = ({}, {"dp_size": 4, "batch_num_tokens": 150.0, "global_batch_size": 20})


def _compare(ref_fn, fn, inputs, grad_index=0, n_out=None):
    outs = []
    for f in (ref_fn, fn):
        x = [t.clone() for t in inputs]
        x[grad_index].requires_grad_(True)
        out = f(x)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        outs.append((out, x[grad_index].grad))
    (ref_out, ref_grad), (out, grad) = outs
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7)
    return ref_out, out


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_policy_loss_matches_openrlhf(mods, loss_type):
    peer, plugin = mods
    logp, old, adv, mask = _batch(row_constant_adv=loss_type == "gspo")
    for token_level in (True, False):
        for dual in (None, 3.0):
            for norms in NORMS:
                kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual, token_level_loss=token_level,
                          policy_loss_type=loss_type)
                theirs, ours = peer.PolicyLoss(**kw), plugin.PolicyLoss(**kw)
                assert isinstance(ours, peer.PolicyLoss)
                ref, out = _compare(lambda x: theirs(x[0], x[1], x[2], action_mask=x[3], **norms),
                                    lambda x: ours(x[0], x[1], x[2], action_mask=x[3], **norms),
                                    [logp, old, adv, mask])
                where = f"{kw} {norms}"
                assert len(out) == len(ref) == 5
                for a, b in zip(out[:3], ref[:3]):
                    torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-7, msg=where)
                assert out[3] is None and ref[3] is None and out[4] is None and ref[4] is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_nonfinite_at_masked_positions(mods, loss_type, bad):
    """NaN / Inf where action_mask is 0, in log_probs, old_log_probs or advantages: our loss, gradient, clip_ratio
    and ppo_kl equal OpenRLHF's on the same batch with finite values there (its own multiply by the mask, so they
    give NaN)."""
    peer, plugin = mods
    logp, old, adv, mask = _batch(seed=4, row_constant_adv=loss_type == "gspo")
    mask[2, 5:] = 0
    off = mask == 0
    for token_level in (True, False):
        for dual in (None, 3.0):
            kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual, token_level_loss=token_level,
                      policy_loss_type=loss_type)
            theirs, ours = peer.PolicyLoss(**kw), plugin.PolicyLoss(**kw)
            for i, name in enumerate(("log_probs", "old_log_probs", "advantages")):
                dirty = [logp, old, adv]
                dirty[i] = dirty[i].masked_fill(off, bad)
                outs = []
                for fn, x in ((theirs, [logp, old, adv]), (ours, dirty)):
                    x = [t.clone() for t in x]
                    x[0].requires_grad_(True)
                    out = fn(x[0], x[1], x[2], action_mask=mask)
                    out[0].backward()
                    outs.append((out, x[0].grad))
                (ref, ref_grad), (out, grad) = outs
                where = f"{kw} {name}={bad}"
                torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7, msg=where)
                for a, b in zip(out[:3], ref[:3]):
                    assert torch.isfinite(a).all(), where
                    torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-7, msg=where)


def test_value_loss_matches_openrlhf(mods):
    peer, plugin = mods
    g = torch.Generator().manual_seed(1)
    old = torch.randn(5, 9, generator=g)
    values = old + 0.5 * torch.randn(5, 9, generator=g)
    returns = torch.randn(5, 9, generator=g)
    _, _, _, mask = _batch(5, 9, seed=2)
    for clip in (None, 0.2):
        for token_level in (True, False):
            for norms in NORMS:
                theirs, ours = peer.ValueLoss(clip, token_level), plugin.ValueLoss(clip, token_level)
                ref, out = _compare(lambda x: theirs(x[0], x[1], x[2], action_mask=x[3], **norms),
                                    lambda x: ours(x[0], x[1], x[2], action_mask=x[3], **norms),
                                    [values, old, returns, mask])
                torch.testing.assert_close(out.detach(), ref.detach(), rtol=2e-6, atol=1e-7,
                                           msg=f"{clip} {token_level} {norms}")


def test_is_correction_runs_openrlhf_forward(mods):
    peer, plugin = mods
    logp, old, adv, mask = _batch(seed=3)
    rollout = old + 0.1 * torch.randn_like(old)
    kw = dict(is_correction_level="token", is_correction_mode="clip")
    out = plugin.PolicyLoss(**kw)(logp, old, adv, action_mask=mask, rollout_log_probs=rollout)
    ref = peer.PolicyLoss(**kw)(logp, old, adv, action_mask=mask, rollout_log_probs=rollout)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_patch_and_unpatch(mods):
    import sys

    peer, plugin = mods
    pkg = sys.modules["openrlhf.models"]
    original = peer.PolicyLoss, peer.ValueLoss
    plugin.patch()
    try:
        assert peer.PolicyLoss is plugin.PolicyLoss and peer.ValueLoss is plugin.ValueLoss
        assert pkg.PolicyLoss is plugin.PolicyLoss and pkg.ValueLoss is plugin.ValueLoss
        plugin.patch()  # idempotent
    finally:
        plugin.unpatch()
    assert (peer.PolicyLoss, peer.ValueLoss) == original
    assert issubclass(plugin.PolicyLoss, original[0])


def test_tested_release_is_declared(mods):
    _peers.assert_declared(mods[1], "openrlhf")


def test_other_releases_are_refused(mods, monkeypatch):
    """On an OpenRLHF release outside SUPPORTED_VERSIONS (the version the check reads is patched, OpenRLHF's code is
    not), asking for our PolicyLoss / ValueLoss or patch() raises, naming both; the override lets them run."""
    _, plugin = mods

    def fresh_classes():
        for name in ("PolicyLoss", "ValueLoss"):
            monkeypatch.delitem(plugin.__dict__, name, raising=False)
        return plugin.PolicyLoss

    def patch_and_undo():
        fresh_classes()
        plugin.patch()
        plugin.unpatch()

    _peers.assert_refuses(monkeypatch, plugin, "openrlhf", fresh_classes, patch_and_undo)
