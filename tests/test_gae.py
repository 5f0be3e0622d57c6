"""gae / gae_packed: every backend vs the float64 reversed loop, gamma/lam grid, holes, left/right padding,
packed streams, lengths 1 and 8191, fused whitening, hand-computed cases, poisoned outputs and bad input."""
import importlib

import pytest
import torch
from _backends import DEVICE, HAS_TRITON, TRITON, native
from _ppo_common import padded_mask, random_mask

from rlhf_fast import _native
from rlhf_fast.ops import gae, gae_packed, reference, use_backend

gae_mod = importlib.import_module("rlhf_fast.ops.gae")  # the module (rlhf_fast.ops.gae is the function)
NATIVE_NAME = "gae_cuda" if DEVICE == "cuda" else "gae_cpu"
NATIVE = native(NATIVE_NAME)
BACKENDS = ["torch", NATIVE, TRITON]
COEFS = [(g, lam) for g in (0.0, 0.5, 0.99, 1.0) for lam in (0.0, 0.5, 0.99, 1.0)]


def _inputs(b, t, dtype=torch.float32):
    return torch.randn(b, t, device=DEVICE).to(dtype), torch.randn(b, t, device=DEVICE).to(dtype)


def _close(got, want, dtype, torch_err=None):
    """float64: tight; float32: within 1e-5 or 2x the error of the same loop run in float32 (flash-attn rule)."""
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    limit = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    if torch_err is not None:
        limit = max(limit, 2 * torch_err)
    assert err <= limit * max(1.0, want.abs().max().item() if want.numel() else 1.0), (err, limit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_gamma_lam_grid_with_holes(backend, dtype):
    r, v = _inputs(4, 37, dtype)
    mask = random_mask(4, 37, empty_rows=(2,))
    with use_backend(backend):
        for g, lam in COEFS:
            adv, ret = gae(r, v, mask, gamma=g, lam=lam)
            ref_adv, ref_ret = reference.gae(r.double(), v.double(), mask, gamma=g, lam=lam)
            f32_err = (reference.gae(r.float(), v.float(), mask, gamma=g, lam=lam)[0].double() - ref_adv).abs().max()
            assert adv.dtype == dtype and not adv.requires_grad
            _close(adv, ref_adv, dtype, f32_err.item())
            _close(ret, ref_ret, dtype, f32_err.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left", (False, True))
def test_left_and_right_padding(backend, left):
    r, v = _inputs(5, 29)
    mask = padded_mask([29, 1, 0, 13, 28], 29, left=left)
    with use_backend(backend):
        adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = reference.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    _close(adv, ref_adv, torch.float32)
    _close(ret, ref_ret, torch.float32)
    # Right padding: the advantage after the last valid token is 0; left padding carries the first one back.
    if not left:
        assert (adv[3, 13:] == 0).all()
    else:
        assert (adv[3, :16] == adv[3, 16]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    with use_backend(backend):
        for shape in ((0, 5), (3, 0)):
            r = torch.randn(shape, device=DEVICE)
            adv, ret = gae(r, r, torch.ones(shape, device=DEVICE), whiten=True)
            assert adv.shape == ret.shape == shape
        empty = torch.zeros(0, device=DEVICE)
        adv, _ = gae_packed(empty, empty, empty, torch.zeros(3, dtype=torch.int64, device=DEVICE))
        assert adv.shape == (0,)


def test_hand_computed():
    # r = (0, 0, 1), V = 0, gamma = 0.5, lam = 1: A_2 = 1, A_1 = 0.5, A_0 = 0.25.
    # Hole: mask (1, 0, 1), r = (0, 5, 1), V = (1, 7, 2), gamma = lam = 1: A_2 = 1 - 2 = -1; t = 1 is skipped and
    # carries A = -1 (return -1 + 7 = 6); A_0 = (0 + V_2 - V_0) + A_2 = (2 - 1) - 1 = 0: the hole's reward is ignored.
    for backend in ("torch", "native") if _native.has(NATIVE_NAME) else ("torch",):
        with use_backend(backend):
            f = lambda *x: torch.tensor([x], dtype=torch.float64, device=DEVICE)  # noqa: E731
            adv, ret = gae(f(0, 0, 1), f(0, 0, 0), f(1, 1, 1), gamma=0.5, lam=1.0)
            assert adv.tolist() == [[0.25, 0.5, 1.0]] and ret.tolist() == [[0.25, 0.5, 1.0]]
            adv, ret = gae(f(0, 5, 1), f(1, 7, 2), f(1, 0, 1), gamma=1.0, lam=1.0)
            assert adv.tolist() == [[0.0, -1.0, -1.0]] and ret.tolist() == [[1.0, 6.0, 1.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_padded(backend):
    lengths = [5, 0, 1, 300, 17]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    r, v = _inputs(1, sum(lengths))
    r, v = r[0], v[0]
    mask = torch.rand(sum(lengths), device=DEVICE) < 0.8
    with use_backend(backend):
        adv, ret = gae_packed(r, v, mask, cu.to(torch.int32), gamma=0.99, lam=0.95)
    ref_adv, ref_ret = reference.gae_packed(r.double(), v.double(), mask, cu, gamma=0.99, lam=0.95)
    _close(adv, ref_adv, torch.float32)
    _close(ret, ref_ret, torch.float32)


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_long_sequences_8191(backend):
    # 33 x 8191 tokens also crosses the native kernel's OpenMP threshold (2^18 tokens).
    r, v = _inputs(33, 8191)
    mask = random_mask(33, 8191, p=0.9)
    mask[0, :] = True
    with use_backend(backend):
        adv, ret = gae(r, v, mask, gamma=0.999, lam=0.97)
    ref_adv, ref_ret = reference.gae(r.double(), v.double(), mask, gamma=0.999, lam=0.97)
    f32_err = (reference.gae(r, v, mask, gamma=0.999, lam=0.97)[0].double() - ref_adv).abs().max().item()
    _close(adv, ref_adv, torch.float32, f32_err)
    _close(ret, ref_ret, torch.float32, f32_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_is_masked_whitening_of_the_advantages(backend):
    r, v = _inputs(3, 41)
    mask = random_mask(3, 41, empty_rows=(1,))
    with use_backend(backend):
        adv, ret = gae(r, v, mask, gamma=1.0, lam=0.95, whiten=True)
    ref_adv, ref_ret = reference.gae(r.double(), v.double(), mask, gamma=1.0, lam=0.95)
    _close(adv, reference.masked_whiten(ref_adv, mask), torch.float32)
    _close(ret, ref_ret, torch.float32)  # returns come from the raw advantages
    assert (adv[~mask] == 0).all()


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_gae_with_whitening_is_two_launches(monkeypatch):
    from rlhf_fast.kernels import gae as kg
    from rlhf_fast.kernels import ppo_losses as kp
    from rlhf_fast.kernels import whiten as kw

    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel)
            return self.kernel[grid]

    for mod in (kg, kw, kp):
        for name in [n for n in dir(mod) if n.endswith("_kernel")]:
            monkeypatch.setattr(mod, name, Counting(getattr(mod, name)))
    r, v = _inputs(3, 41)
    with use_backend("triton"):
        gae(r, v, random_mask(3, 41), whiten=True)
    assert len(launches) == 2, launches


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_kernels_write_every_output(backend):
    if backend == "native" and not _native.has(NATIVE_NAME) or backend == "triton" and not HAS_TRITON:
        pytest.skip(f"{backend} backend unavailable")
    lengths = [7, 1, 0, 40]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    r, v = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    m8 = (torch.rand(48, device=DEVICE) < 0.7).to(torch.uint8)
    adv, ret = torch.full_like(r, float("nan")), torch.full_like(r, float("nan"))
    if backend == "native":
        gae_mod.gae_native(r, v, m8, cu, adv, ret, 0.9, 0.8)
    else:
        from rlhf_fast.kernels import gae as kg

        kg.gae_scan(r, v, m8, cu, adv, ret, 0.9, 0.8, max_len=40)
    assert not adv.isnan().any() and not ret.isnan().any()
    want, _ = reference.gae_packed(r.double(), v.double(), m8.bool(), cu, gamma=0.9, lam=0.8)
    _close(adv, want, torch.float32)


@pytest.mark.skipif(DEVICE != "cpu" or not _native.has("gae_cpu"), reason="native CPU kernel unavailable")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_native_cpu_pairs_are_bitwise_one_by_one(dtype):
    """gae_cpu sweeps two sequences at a time (interleaved over their common length, then the longer one's rest);
    every token must get exactly the bits of a sweep of its sequence alone, non-finite inputs included (NaN, +-Inf
    at valid and masked tokens, gamma * lam = 0 where 0 * Inf = NaN), for unequal lengths and an odd count."""
    lengths = [5, 9, 0, 3, 17, 17, 1, 40, 2]
    cu = torch.tensor([0] + lengths).cumsum(0)
    n = int(cu[-1])
    r, v = torch.randn(n, dtype=torch.float64).to(dtype), torch.randn(n, dtype=torch.float64).to(dtype)
    m8 = (torch.rand(n) < 0.8).to(torch.uint8)
    for i, x in zip((3, 20, 30, 41, 52, 70, 88), (float("nan"), float("inf"), -float("inf"), float("nan"),
                                                   float("inf"), -float("inf"), float("nan"))):
        (r if i % 2 else v)[i] = x
    m8[[20, 30]] = 1
    m8[52] = 0
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    for g, lam in ((0.99, 0.95), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        adv, ret = torch.full_like(r, float("nan")), torch.full_like(r, float("nan"))
        gae_mod._call_native(r, v, m8, cu, adv, ret, g, lam)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            a1, r1 = torch.full_like(r[s:e], float("nan")), torch.full_like(r[s:e], float("nan"))
            gae_mod._call_native(r[s:e], v[s:e], m8[s:e], torch.tensor([0, e - s]), a1, r1, g, lam)
            for got, want in ((adv[s:e], a1), (ret[s:e], r1)):
                assert torch.equal(got.view(bits), want.view(bits)), (g, lam, s, e)


@pytest.mark.parametrize("backend", [NATIVE, TRITON])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_inputs(backend, dtype):
    r, v = _inputs(3, 50, dtype)
    mask = random_mask(3, 50)
    with use_backend(backend):
        adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == dtype
    want, want_ret = reference.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    # accumulation in float32 or wider: only the final rounding to 16 bits remains
    torch.testing.assert_close(adv.double(), want, atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(ret.double(), want_ret, atol=5e-2, rtol=1e-2)


def test_bad_input():
    r, v = _inputs(2, 5)
    mask = torch.ones(2, 5, device=DEVICE)
    for bad in (-0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="gamma must be a real number in"):
            gae(r, v, mask, gamma=bad)
        with pytest.raises(ValueError, match="lam must be a real number in"):
            gae(r, v, mask, lam=bad)
    with pytest.raises(ValueError, match="rewards must have the same shape"):
        gae(r[:, :4], v, mask)
    with pytest.raises(ValueError, match="mask must have the same shape"):
        gae(r, v, mask[:1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        gae(r, v, mask * 0.5)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        gae(r[0], v[0], mask[0])
    with pytest.raises(TypeError, match="rewards must have dtype"):
        gae(r.long(), v, mask)
    flat = torch.ones(10, device=DEVICE)
    for cu in ([1, 10], [0, 6, 4, 10], [0, 9]):
        with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
            gae_packed(flat, flat, flat, torch.tensor(cu, device=DEVICE))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        gae_packed(flat, flat, flat, torch.tensor([0.0, 10.0], device=DEVICE))
    if _native.has("gae_cpu"):  # the extension checks too
        with pytest.raises(ValueError, match="gamma must be in"):
            _native.fn("gae_cpu")(0, 0, 0, 0, 0, 0, 0, 0, 2.0, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_reward_stays_in_its_sequence_and_out_of_the_whitening(backend):
    """A non-finite reward or value at a valid token makes that token's advantage (and, by the recursion, the
    earlier valid tokens' of the same sequence) non-finite; whitening leaves them so and computes its statistics
    over the finite advantages only, so every other token is whitened as if they were masked, and the policy loss
    later drops and counts them."""
    r, v = _inputs(4, 11, torch.float64)
    mask = random_mask(4, 11, empty_rows=(3,), p=0.8)
    mask[2, 6] = True
    r[2, 6] = float("nan")
    v[0, 4] = float("inf")
    mask[0, 4] = True
    r[1, 2], mask[1, 2] = float("nan"), False  # masked: ignored entirely
    raw, _ = reference.gae(r, v, mask, gamma=0.9, lam=0.8)
    bad = mask & ~torch.isfinite(raw)
    assert bad[2, 6] and bad[0, 4] and not bad[1].any() and not bad[3].any()
    good = mask & ~bad
    sel = raw[good]
    want = torch.where(good, (raw - sel.mean()) / torch.sqrt(sel.var() + 1e-8), torch.zeros_like(raw))
    with use_backend(backend):
        adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8, whiten=True)
        cu = torch.arange(0, 45, 11, device=DEVICE)
        adv_p, _ = gae_packed(r.reshape(-1), v.reshape(-1), mask.reshape(-1), cu, gamma=0.9, lam=0.8, whiten=True)
    for a in (adv, adv_p.view(4, 11)):
        assert torch.equal(~torch.isfinite(a) & mask, bad)
        torch.testing.assert_close(torch.where(good, a, 0.0), want, atol=1e-10, rtol=1e-10)
        assert (a[~mask] == 0).all()
    assert torch.equal(~torch.isfinite(ret) & mask, bad)
