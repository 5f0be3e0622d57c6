"""group_advantages (GRPO / Dr. GRPO / RLOO / REINFORCE++-baseline) on every backend vs the float64 loop over groups,
on odd batch sizes with shuffled group ids, groups of one and zero-std groups; the peers' own formulas (verl's
per-row loops, TRL's reshaped view) written out; REINFORCE++ and ReMax as compositions; bad input."""
import pytest
import torch
from _backends import DEVICE, TRITON, native
from _ppo_common import random_mask

from rlhf_fast.ops import (expand_advantages, group_advantages, reference, reinforce_pp_advantages,
                           remax_advantages, use_backend)

BACKENDS = ["torch", native("group_advantages_cpu", cpu_only=True), TRITON]
CASES = [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "group"),
         ("reinforce_pp_baseline", "group")]


def _batch(b, dtype, *, binary=False):
    """Scores (B,), shuffled non-contiguous ids (B,) with a group of one and a zero-std group, mask (B, 13)."""
    g = torch.Generator().manual_seed(b)
    ids = torch.randint(0, max(b // 6, 2), (b,), generator=g) * 37 - 50  # negative, sparse ids
    ids[ids == ids[-1]] = ids[0]  # ... then make sure the last row is alone
    ids[-1] = 10_000
    ids = ids[torch.randperm(b, generator=g)]
    s = (torch.rand(b, generator=g) < 0.5).double() if binary else torch.randn(b, generator=g, dtype=torch.float64)
    s[ids == ids[0]] = 1.0  # a zero-std group (every sample right)
    mask = random_mask(b, 13, device="cpu")
    return s.to(DEVICE, dtype), ids.to(DEVICE), mask.to(DEVICE)


def _ref(s, ids, mode, scale, mask, keep):
    w = mask.sum(-1).double().cpu() if mode == "reinforce_pp_baseline" else None
    return reference.group_advantages(s.double().cpu(), ids.cpu(), mode, scale=scale, weights=w,
                                      keep_singletons=keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
@pytest.mark.parametrize("b", (41, pytest.param(341, marks=pytest.mark.slow)))
def test_every_mode_matches_float64_reference(backend, dtype, b):
    if b > 100 and (backend == "triton" or dtype != torch.float32):
        pytest.skip("the large batch runs once, float32, compiled backends (the interpreter takes ~50 s)")
    s, ids, mask = _batch(b, dtype, binary=dtype != torch.float64)
    for mode, scale in CASES:
        for keep in (False, True):
            want, mean, std, count = _ref(s, ids, mode, scale, mask, keep)
            with use_backend(backend):
                got = group_advantages(s, ids, mode, scale=scale, mask=mask, keep_singletons=keep)
            # float32 / bfloat16: within 2x the error of the same loop run in the input's dtype (flash-attn rule)
            same = reference.group_advantages(s.cpu(), ids.cpu(), mode, scale=scale, keep_singletons=keep,
                                              weights=None if mode != "reinforce_pp_baseline" else
                                              mask.sum(-1).to(s.dtype).cpu())[0].double()
            base = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype] * max(1, want.abs().max())
            limit = max(base, 2 * float((same - want).abs().max()))
            assert got.advantages.dtype == dtype and got.advantages.shape == (b,)
            assert not got.advantages.isnan().any(), "an advantage was never written"
            err = float((got.advantages.double().cpu() - want).abs().max())
            assert err <= limit, (mode, scale, keep, err, limit)
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got.group_mean.double().cpu(), mean, atol=tol * 10, rtol=tol)
            torch.testing.assert_close(got.group_std.double().cpu(), std, atol=tol * 10, rtol=tol)
            assert torch.equal(got.group_count.cpu(), count)
            assert torch.equal(got.groups.cpu(), torch.unique(ids.cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_one_zero_std_and_the_dapo_filter(backend):
    s = torch.tensor([3.0, 1.0, 0.0, 1.0, 1.0, 2.0], device=DEVICE, dtype=torch.float64)
    ids = torch.tensor([9, 4, 4, 7, 7, 4], device=DEVICE)  # group 9: one row; group 7: std 0
    with use_backend(backend):
        out = group_advantages(s, ids, "grpo")
        kept = group_advantages(s, ids, "grpo", keep_singletons=True)
        rloo = group_advantages(s, ids, "rloo")
    sd = 1.0  # group 4: scores 1, 0, 2: mean 1, Bessel std 1
    torch.testing.assert_close(out.advantages.cpu(), torch.tensor([0.0, 0.0, -1 / (sd + 1e-6), 0.0, 0.0,
                                                                   1 / (sd + 1e-6)], dtype=torch.float64))
    assert float(kept.advantages[0]) == pytest.approx(3.0 / (1 + 1e-6))  # verl: mean 0, std 1 for a group of one
    torch.testing.assert_close(rloo.advantages.cpu(), torch.tensor([0.0, 0.0, -1.5, 0.0, 0.0, 1.5],
                                                                   dtype=torch.float64))
    assert out.groups.tolist() == [4, 7, 9] and out.group_count.tolist() == [3, 2, 1]
    assert out.group_std.tolist() == [1.0, 0.0, 0.0]
    assert out.nonzero_std().tolist() == [False, True, True, False, False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_order_does_not_matter(backend):
    s, ids, mask = _batch(43, torch.float32)
    perm = torch.randperm(43, device=DEVICE)
    with use_backend(backend):
        for mode, scale in CASES:
            a = group_advantages(s, ids, mode, scale=scale, mask=mask).advantages
            b = group_advantages(s[perm], ids[perm], mode, scale=scale, mask=mask[perm]).advantages
            torch.testing.assert_close(b, a[perm], atol=1e-6, rtol=1e-5)


def _verl_loops(s, ids, mode, eps=1e-6, norm_by_std=True):
    """verl's grpo / rloo / reinforce_plus_plus_baseline outcome estimators, written out as their per-row loops."""
    by_id = {}
    for i, k in enumerate(ids.tolist()):
        by_id.setdefault(k, []).append(float(s[i]))
    out = []
    for i, k in enumerate(ids.tolist()):
        xs = torch.tensor(by_id[k], dtype=torch.float64)
        mean, std = (0.0, 1.0) if len(xs) == 1 else (float(xs.mean()), float(xs.std()))
        if mode == "grpo":
            out.append((float(s[i]) - mean) / (std + eps) if norm_by_std else float(s[i]) - mean)
        elif mode == "rloo":
            n = len(xs)
            out.append(float(s[i]) * n / (n - 1) - mean * n / (n - 1) if n > 1 else float(s[i]))
        else:
            out.append(float(s[i]) - mean)
    return torch.tensor(out, dtype=torch.float64)


def test_matches_the_peers_formulas():
    s, ids, mask = _batch(61, torch.float64)
    s, ids, mask = s.cpu(), ids.cpu(), mask.cpu()
    for mode in ("grpo", "rloo"):
        got = group_advantages(s, ids, mode, keep_singletons=True).advantages
        torch.testing.assert_close(got, _verl_loops(s, ids, mode))
    got = group_advantages(s, ids, "grpo", scale="none", keep_singletons=True).advantages
    torch.testing.assert_close(got, _verl_loops(s, ids, "grpo", norm_by_std=False))
    # verl's REINFORCE++-baseline whitens the (B, T) tiled centred scores over the mask
    centred = _verl_loops(s, ids, "reinforce_pp_baseline")[:, None].expand(-1, mask.shape[1])
    want = reference.masked_whiten(centred, mask)
    got = group_advantages(s, ids, "reinforce_pp_baseline", mask=mask, keep_singletons=True).advantages
    torch.testing.assert_close(expand_advantages(got, mask), want)
    # TRL: contiguous groups of num_generations, view(-1, G) statistics, 1e-4 added to the std
    r = torch.randn(8 * 5, dtype=torch.float64)
    grouped = r.view(-1, 5)
    centred = r - grouped.mean(1).repeat_interleave(5)
    uid = torch.arange(8).repeat_interleave(5)
    for scale, std in (("group", grouped.std(1).repeat_interleave(5)), ("batch", r.std()), ("none", None)):
        want = centred if std is None else centred / (std + 1e-4)
        torch.testing.assert_close(group_advantages(r, uid, "grpo", scale=scale, eps=1e-4).advantages, want)


def test_list_of_string_ids_and_empty_batch():
    s = torch.tensor([1.0, 0.0, 1.0, 1.0])
    out = group_advantages(s, ["b", "a", "b", "a"], "rloo")
    torch.testing.assert_close(out.advantages, torch.tensor([0.0, -1.0, 0.0, 1.0]))
    assert out.groups.tolist() == [0, 1] and out.group_index.tolist() == [0, 1, 0, 1]
    empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert empty.advantages.shape == (0,) and empty.group_mean.shape == (0,)


def test_expand_advantages():
    adv = torch.tensor([1.5, -2.0, 0.25])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(expand_advantages(adv, mask),
                               torch.tensor([[1.5, 1.5, 0.0], [0.0, -2.0, -2.0], [0.0, 0.0, 0.0]]))


def test_reinforce_pp_and_remax_are_token_rewards_then_gae():
    b, t = 7, 19
    scores, base = torch.randn(b, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    logp, ref_logp = torch.randn(b, t, dtype=torch.float64) - 2, torch.randn(b, t, dtype=torch.float64) - 2
    lengths = torch.randint(1, t + 1, (b,))
    mask = torch.arange(t)[None] < lengths[:, None]  # right padding: verl's "reset after EOS" loop agrees
    rewards = -0.05 * (logp - ref_logp) * mask
    rewards[torch.arange(b), lengths - 1] += scores
    for gamma in (1.0, 0.9):  # verl's REINFORCE++: discounted return to go, reset after EOS, then whitened
        ret, running = torch.zeros(b, t, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        for k in reversed(range(t)):
            running = rewards[:, k] + gamma * running
            ret[:, k] = running
            running = running * mask[:, k]
        want = reference.masked_whiten(ret, mask)
        got = reinforce_pp_advantages(scores, logp, ref_logp, mask, kl_coef=0.05, gamma=gamma)
        torch.testing.assert_close(got, want)
    # ReMax: return to go (gamma 1) minus the greedy baseline's score on every valid token
    want = (rewards * mask).flip(-1).cumsum(-1).flip(-1) - base[:, None] * mask
    got = remax_advantages(scores, base, logp, ref_logp, mask, kl_coef=0.05)
    torch.testing.assert_close(got, want)


def test_bad_input_names_the_argument():
    s, ids = torch.randn(6), torch.arange(6) // 2
    with pytest.raises(TypeError, match="scores"):
        group_advantages(s.long(), ids)
    with pytest.raises(ValueError, match="scores"):
        group_advantages(s[None], ids)
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(s, ids.float())
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(s, ids[:5])
    with pytest.raises(ValueError, match="mode"):
        group_advantages(s, ids, "ppo")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(s, ids, "grpo", scale="tokens")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(s, ids, "rloo", scale="batch")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(s, ids, eps=-1.0)
    with pytest.raises(ValueError, match="mask"):
        group_advantages(s, ids, "reinforce_pp_baseline", mask=torch.ones(5, 3))
    with pytest.raises(ValueError, match="mask"):
        group_advantages(s, ids, "reinforce_pp_baseline", mask=torch.full((6, 3), 2.0))
    with pytest.raises(ValueError, match="mask"):
        expand_advantages(s, torch.ones(5, 3))
    with pytest.raises(ValueError, match="baseline_scores"):
        remax_advantages(s, s[:3], torch.zeros(6, 2), torch.zeros(6, 2), torch.ones(6, 2), kl_coef=0.0)
