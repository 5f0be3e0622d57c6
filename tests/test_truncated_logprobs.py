"""Log-probs under the truncated (top-k / top-p) distribution a rollout samples from: the support threshold of every
backend against the float64 sort + cumsum oracle and the samplers' own keep sets (Hugging Face's warpers, the
rollout's keep_mask); token_logprobs, linear_token_logprobs and ppo_loss_from_hidden in value and gradient against
float64, ties at the threshold, replay vs recompute, a label outside the support, and top_k=0 / top_p=1 unchanged;
with the final logit soft-cap (softcap), the support on the capped, tempered logits."""
import importlib.util
import math

import pytest
import torch
from conftest import tol

from _backends import DEVICE, HAS_TRITON, NATIVE_LOGPROBS, TRITON, native

from rlhf_fast.ops import (KLTerm, PPOClip, linear_token_logprobs, ppo_loss_from_hidden, reference,
                           support_threshold, token_logprobs, use_backend)
from rlhf_fast.rollout.sampling import keep_mask

NATIVE_SUPPORT = native("support_threshold_cpu")
BACKENDS = ["torch", NATIVE_LOGPROBS, TRITON]
CUTS = [(5, 1.0), (0, 0.8), (9, 0.6), (1, 1.0), (0, 0.05)]  # (top_k, top_p)


def _interpreter_size(backend, n):
    """The Triton interpreter runs one program at a time: keep its rows few (every size runs on CUDA)."""
    if backend == "triton" and DEVICE == "cpu" and n > 5:
        pytest.skip("Triton under the interpreter: small shapes only")


def _on(backend, *tensors):
    """Triton runs on CUDA, or on CPU tensors under the interpreter (small shapes)."""
    dev = DEVICE if backend == "triton" else "cpu"
    return [None if t is None else t.to(dev) for t in tensors]


def _logits(n, vocab, dtype=torch.float32, scale=3.0, ignore_frac=0.2):
    logits = (torch.randn(n, vocab) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_frac] = -100
    return logits, labels


def _kept(logits, temperature, thr, softcap=0.0):
    """(N, V) bool: the support {z >= thr} of each row."""
    return reference.soft_cap(logits.double(), softcap) * (1.0 / temperature) >= thr.double().unsqueeze(-1)


# --- the threshold -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", NATIVE_SUPPORT, TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,vocab", [(1, 37), (5, 341), (41, 37), (3, 1031)])  # 1031: 3 Triton tiles
@pytest.mark.parametrize("top_k,top_p", CUTS)
def test_threshold_matches_oracle(backend, dtype, n, vocab, top_k, top_p):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton computes in fp32 (fp64 goes to torch)")
    _interpreter_size(backend, n)
    logits, _ = _logits(n, vocab, dtype)
    (x,) = _on(backend, logits)
    with use_backend(backend):
        thr = support_threshold(x, temperature=0.5, top_k=top_k, top_p=top_p)
    ref = reference.support_threshold(logits, temperature=0.5, top_k=top_k, top_p=top_p)
    assert thr.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and thr.shape == (n,)
    assert torch.equal(thr.cpu(), ref)  # a value of the row, found exactly


@pytest.mark.parametrize("top_k,top_p", CUTS + [(0, 0.9), (50, 0.95)])
def test_oracle_keeps_the_samplers_sets(top_k, top_p):
    """Without ties, the kept set {z >= thr} is the rollout sampler's keep_mask and Hugging Face's warpers' set."""
    z = torch.randn(64, 341, dtype=torch.float64) * 2
    thr = reference.support_threshold(z, top_k=top_k, top_p=top_p)
    kept = z >= thr.unsqueeze(-1)
    assert torch.equal(kept, keep_mask(z, top_k, top_p))
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    w = z.clone()
    if top_k:
        w = TopKLogitsWarper(top_k)(None, w)
    if top_p < 1:
        w = TopPLogitsWarper(top_p)(None, w)
    assert torch.equal(kept, w > float("-inf"))


@pytest.mark.parametrize("backend", ["torch", NATIVE_SUPPORT, TRITON])
def test_ties_at_the_threshold_are_kept(backend):
    row = torch.tensor([5.0, 4.0, 4.0, 4.0, 3.0, 1.0, 1.0, 0.0, -2.0])
    logits = torch.stack([row, row.flip(0), torch.full((9,), 2.0)])  # (3, 9): ties in any place; all equal
    (x,) = _on(backend, logits)
    with use_backend(backend):
        thr = support_threshold(x, top_k=2, top_p=1.0).cpu()
        thr_p = [support_threshold(x, top_k=0, top_p=p).cpu() for p in (0.4, 0.5)]
    assert thr.tolist() == [4.0, 4.0, 2.0]  # k = 2 keeps 5, 4, 4, 4 (every tie of the 2nd largest)
    assert torch.equal(thr, reference.support_threshold(logits, top_k=2))
    for p, t in zip((0.4, 0.5), thr_p):
        assert torch.equal(t, reference.support_threshold(logits, top_p=p))
    # p(5) = 0.44: enough alone for 0.4; 0.5 is crossed by the 4s, all three kept; an all-equal row keeps everything
    assert thr_p[0].tolist() == [5.0, 5.0, 2.0] and thr_p[1].tolist() == [4.0, 4.0, 2.0]


@pytest.mark.parametrize("backend", ["torch", NATIVE_SUPPORT, TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (9, 0.6)])
@pytest.mark.parametrize("softcap", [30.0, 2.0])
def test_threshold_on_capped_logits(backend, dtype, top_k, top_p, softcap):
    """With a soft-cap the threshold is on z = softcap * tanh(logits / softcap) / temperature: the oracle's value,
    up to the rounding of each backend's tanh (exact on the torch backend, which caps as the oracle does)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton computes in fp32 (fp64 goes to torch)")
    logits, _ = _logits(5, 341, dtype)
    (x,) = _on(backend, logits)
    with use_backend(backend):
        thr = support_threshold(x, temperature=0.5, top_k=top_k, top_p=top_p, softcap=softcap).cpu()
    ref = reference.support_threshold(logits, temperature=0.5, top_k=top_k, top_p=top_p, softcap=softcap)
    if backend == "torch":
        assert torch.equal(thr, ref)
    t = tol(dtype)
    torch.testing.assert_close(thr, ref, atol=t["atol"], rtol=t["rtol"] if dtype == torch.float64 else 1e-6)
    uncapped = reference.support_threshold(logits, temperature=0.5, top_k=top_k, top_p=top_p)
    assert (thr - uncapped).abs().max() > 0.1  # the cap moved the thresholds
    with pytest.raises(ValueError, match="softcap"):
        support_threshold(x, top_k=top_k, softcap=-2.0)


def test_threshold_off_and_checks():
    x = torch.randn(2, 3, 11)
    for k, p in [(0, 1.0), (11, 1.0), (40, 1.0)]:
        assert torch.equal(support_threshold(x, top_k=k, top_p=p), torch.full((2, 3), float("-inf")))
    for bad in [dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=2.0), dict(temperature=0.0)]:
        with pytest.raises(ValueError):
            support_threshold(x, **bad)


# --- token_logprobs ----------------------------------------------------------------------------------------------

def _check_logprobs(backend, logits, labels, *, temperature, top_k, top_p, t, softcap=0.0):
    x, y = _on(backend, logits, labels)
    x = x.detach().clone().requires_grad_(True)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, return_entropy=True, softcap=softcap)
    with use_backend(backend):
        logp, ent = token_logprobs(x, y, **kw)
    x64 = logits.detach().double().requires_grad_(True)
    ref_logp, ref_ent = reference.token_logprobs(x64, labels, **kw)
    torch.testing.assert_close(logp.cpu().double(), ref_logp.detach(), **t)
    torch.testing.assert_close(ent.cpu().double(), ref_ent.detach(), **t)
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    (dx,) = torch.autograd.grad((logp * g1.to(logp)).sum() + (ent * g2.to(ent)).sum(), x)
    (dref,) = torch.autograd.grad((ref_logp * g1).sum() + (ref_ent * g2).sum(), x64)
    assert dx.dtype == logits.dtype
    torch.testing.assert_close(dx.cpu().double(), dref, atol=t["atol"] * 4, rtol=t["rtol"] * 4)
    thr = reference.support_threshold(logits.double(), temperature=temperature, top_k=top_k, top_p=top_p,
                                      softcap=softcap)
    cut = ~_kept(logits, temperature, thr, softcap) & (torch.arange(logits.shape[-1]) != labels.unsqueeze(-1))
    assert torch.equal(dx.cpu()[cut], torch.zeros_like(dx.cpu()[cut]))  # no gradient off the support


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,vocab", [(1, 37), (5, 341), (41, 37), (3, 1031)])  # 1031: 3 Triton tiles
@pytest.mark.parametrize("top_k,top_p", CUTS)
def test_token_logprobs_matches_fp64(backend, dtype, n, vocab, top_k, top_p):
    _interpreter_size(backend, n)
    logits, labels = _logits(n, vocab, dtype)
    _check_logprobs(backend, logits, labels, temperature=0.7 if vocab == 37 else 1.0, top_k=top_k, top_p=top_p,
                    t=tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (9, 0.6)])
@pytest.mark.parametrize("softcap", [30.0, 2.0])
def test_token_logprobs_softcap_matches_fp64(backend, dtype, top_k, top_p, softcap):
    """The truncated distribution of the soft-capped logits: support, log-prob, entropy and gradient (through the
    cap's derivative, zero off the support) against float64."""
    logits, labels = _logits(5, 341, dtype)
    _check_logprobs(backend, logits, labels, temperature=0.7, top_k=top_k, top_p=top_p, t=tol(dtype), softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_ties_and_banned_tokens(backend):
    n = 5 if backend == "triton" and DEVICE == "cpu" else 23
    logits = torch.randint(-4, 5, (n, 41)).float()  # many exact ties at every threshold
    logits[3, :7] = float("-inf")
    labels = torch.randint(0, 41, (n,))
    labels[1] = -100
    for top_k, top_p in [(3, 1.0), (0, 0.7), (6, 0.5), (41, 1.0)]:
        _check_logprobs(backend, logits, labels, temperature=1.0, top_k=top_k, top_p=top_p, t=tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_cut_is_bitwise_the_full_softmax(backend):
    logits, labels = _on(backend, *_logits(9, 37))
    with use_backend(backend):
        base = token_logprobs(logits, labels, temperature=0.8, return_entropy=True)
        for top_k, top_p in [(0, 1.0), (37, 1.0), (100, 1.0)]:
            out = token_logprobs(logits, labels, temperature=0.8, top_k=top_k, top_p=top_p, return_entropy=True)
            assert all(torch.equal(a, b) for a, b in zip(out, base))
        inf = torch.full(labels.shape, float("-inf"), device=labels.device)
        out = token_logprobs(logits, labels, temperature=0.8, support="replay", support_threshold=inf,
                             return_entropy=True)
        assert all(torch.equal(a, b) for a, b in zip(out, base))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_replay_equals_recompute_at_unchanged_logits(backend, softcap):
    """The selection pass and the row kernels compute the same z (soft-capped too): a recorded threshold is a value
    of the row the kernels cut at, so replaying it is bitwise the recomputed support."""
    logits, labels = _on(backend, *_logits(13, 37))
    with use_backend(backend):
        thr = support_threshold(logits, temperature=0.6, top_k=7, top_p=0.8, softcap=softcap)  # the engine's record
        a = token_logprobs(logits, labels, temperature=0.6, top_k=7, top_p=0.8, return_entropy=True, softcap=softcap)
        b = token_logprobs(logits, labels, temperature=0.6, support="replay", support_threshold=thr,
                           return_entropy=True, softcap=softcap)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_outside_the_support_stays_finite(backend):
    logits, _ = _logits(6, 37, ignore_frac=0.0)
    labels = logits.argmin(-1)  # never in a top-3 support
    x, y = _on(backend, logits, labels)
    x = x.requires_grad_(True)
    with use_backend(backend):
        logp, ent = token_logprobs(x, y, top_k=3, return_entropy=True)
    (dx,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(dx).all()
    top3 = logits.topk(3, -1).values
    kept = torch.cat([top3, logits.gather(-1, labels[:, None])], -1).double()  # the support: top 3 and the label
    torch.testing.assert_close(logp.cpu().double(), kept[:, -1] - kept.logsumexp(-1), **tol(torch.float32))


def test_bad_support_arguments():
    logits, labels = _logits(4, 11)
    thr = torch.zeros(4)
    for kw in [dict(support="replay"), dict(support_threshold=thr), dict(support="fixed"),
               dict(support="replay", support_threshold=torch.zeros(5)), dict(top_k=-2), dict(top_p=0.0)]:
        with pytest.raises(ValueError):
            token_logprobs(logits, labels, **kw)
        with pytest.raises(ValueError):
            linear_token_logprobs(torch.randn(4, 3), torch.randn(11, 3), labels, **kw)


@pytest.mark.parametrize("kind", ["native", "triton"])
def test_selection_writes_every_row(kind):
    """The thresholds poisoned with NaN before the selection pass writes them."""
    logits, _ = _logits(23, 301 if kind == "native" else 45)
    thr = torch.full((23,), float("nan"))
    if kind == "native":
        from rlhf_fast import _native

        if not _native.has("support_threshold_cpu"):
            pytest.skip("rlhf_fast._C is not built")
        _native.call("support_threshold_cpu", _native.arg("logits", logits, code=True), 23, logits.shape[1], 2.0, 0.0,
                     7, 0.8, _native.arg("thr", thr, torch.float32))
    else:
        if not HAS_TRITON:
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        from rlhf_fast.kernels.support import support_threshold as launch

        launch(logits, 2.0, 7, 0.8, thr)
    assert torch.equal(thr, reference.support_threshold(logits, temperature=0.5, top_k=7, top_p=0.8))


@pytest.mark.parametrize("kind", ["native", "triton"])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_row_kernels_write_every_output(kind, softcap):
    """Outputs poisoned with NaN before the kernels write them, with a threshold per row (and -inf: no cut)."""
    if kind == "native":
        from rlhf_fast import _native

        if not _native.has("token_logprobs_fwd_cpu"):
            pytest.skip("rlhf_fast._C is not built")
        from rlhf_fast.ops._linear_chunked import native_rows_bwd as rows_bwd, native_rows_fwd as rows_fwd
    else:
        if not HAS_TRITON:
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        from rlhf_fast.kernels.logprobs import logprobs_bwd as rows_bwd, logprobs_fwd as rows_fwd
    logits, labels = _logits(37, 301 if kind == "native" else 45)
    # the oracle's thresholds of the capped logits, moved half-way to the next value below (no ulp-level boundary)
    z = reference.soft_cap(logits.double(), softcap) * 0.5
    top = reference.support_threshold(logits.double(), temperature=2.0, top_k=4, top_p=0.9, softcap=softcap)
    below = torch.where(z < top[:, None], z, float("-inf")).amax(-1)
    thr = ((top + below) / 2).float()
    thr[2] = float("-inf")
    logp, lse, ent = (torch.full((37,), float("nan")) for _ in range(3))
    rows_fwd(logits, labels, 0.5, -100, logp, lse, ent, thr, softcap)
    x64 = logits.double().requires_grad_(True)
    ref_logp, ref_ent = reference.token_logprobs(x64, labels, temperature=2.0, support_threshold=thr,
                                                 return_entropy=True, softcap=softcap)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **tol(torch.float32))
    torch.testing.assert_close(ent.double(), ref_ent.detach(), **tol(torch.float32))
    g, gh = torch.randn(37), torch.randn(37)
    (ref_dx,) = torch.autograd.grad((ref_logp * g.double()).sum() + (ref_ent * gh.double()).sum(), x64)
    out = torch.full_like(logits, float("nan"))
    rows_bwd(logits, labels, lse, ent, g, gh, 0.5, -100, out, thr, softcap)
    buf = logits.clone()
    rows_bwd(buf, labels, lse, ent, g, gh, 0.5, -100, buf, thr, softcap)  # in place
    assert torch.isfinite(out).all() and torch.equal(out, buf)
    torch.testing.assert_close(out.double(), ref_dx, atol=4e-5, rtol=4e-5)


# --- from hidden states ------------------------------------------------------------------------------------------

def _hidden_inputs(lead, width, vocab, dtype, *, bias=True):
    hidden = torch.randn(*lead, width).to(dtype)
    weight = (torch.randn(vocab, width) / width**0.5 * 3).to(dtype)
    b = (torch.randn(vocab) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < 0.25] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,width,vocab", [((1,), 8, 37), ((5, 9), 16, 341), ((41,), 12, 37)])
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (9, 0.6)])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_linear_matches_fp64(backend, dtype, lead, width, vocab, top_k, top_p, softcap):
    _interpreter_size(backend, lead[0])
    hidden, weight, bias, labels = _hidden_inputs(lead, width, vocab, dtype, bias=vocab != 37)
    leaves = [t.detach().clone().requires_grad_(True) for t in _on(backend, hidden, weight, bias) if t is not None]
    refs = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    kw = dict(temperature=0.8, top_k=top_k, top_p=top_p, return_entropy=True, softcap=softcap)
    with use_backend(backend):
        logp, ent = linear_token_logprobs(leaves[0], leaves[1], labels.to(leaves[0].device),
                                          bias=leaves[2] if bias is not None else None, chunk_size=7, **kw)
    ref_logp, ref_ent = reference.linear_token_logprobs(refs[0], refs[1], labels,
                                                        bias=refs[2] if bias is not None else None, **kw)
    t = tol(dtype)
    torch.testing.assert_close(logp.cpu().double(), ref_logp.detach(), **t)
    torch.testing.assert_close(ent.cpu().double(), ref_ent.detach(), **t)
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    grads = torch.autograd.grad((logp * g1.to(logp)).sum() + (ent * g2.to(ent)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_logp * g1).sum() + (ref_ent * g2).sum(), refs)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.cpu().double(), r, atol=t["atol"] * 4, rtol=t["rtol"] * 4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ties_replay_and_no_cut(backend, dtype):
    # small integers: every logit exact in any summation order and in bf16, so the ties are exact too
    hidden = torch.randint(-2, 3, (11, 6)).to(dtype)
    weight = torch.randint(-2, 3, (29, 6)).to(dtype)
    weight[7] = weight[3]  # duplicate vocabulary rows: tied logits
    bias = torch.randint(-1, 2, (29,)).to(dtype)
    labels = torch.randint(0, 29, (11,))
    labels[4] = -100
    logits = hidden.double() @ weight.double().t() + bias.double()
    h, w, b, y = _on(backend, hidden, weight, bias, labels)
    h.requires_grad_(True)
    with use_backend(backend):
        base = linear_token_logprobs(h, w, y, bias=b, return_entropy=True)
        off = linear_token_logprobs(h, w, y, bias=b, top_k=29, top_p=1.0, return_entropy=True)
        assert all(torch.equal(u, v) for u, v in zip(base, off))
        thr = support_threshold(logits.float().to(h.device), top_k=4, top_p=0.9)
        rec = linear_token_logprobs(h, w, y, bias=b, top_k=4, top_p=0.9, return_entropy=True)
        rep = linear_token_logprobs(h, w, y, bias=b, support="replay", support_threshold=thr, return_entropy=True)
    assert all(torch.equal(u, v) for u, v in zip(rec, rep))
    h64 = hidden.double().requires_grad_(True)
    ref = reference.linear_token_logprobs(h64, weight.double(), labels, bias=bias.double(), top_k=4, top_p=0.9,
                                          return_entropy=True)
    for u, r in zip(rec, ref):
        torch.testing.assert_close(u.cpu().double(), r.detach(), **tol(torch.float32))
    g = torch.randn(11, dtype=torch.float64)
    (dh,) = torch.autograd.grad((rec[0] * g.to(rec[0])).sum() + rec[1].sum(), h)
    (dref,) = torch.autograd.grad((ref[0] * g).sum() + ref[1].sum(), h64)
    torch.testing.assert_close(dh.cpu().double(), dref, **tol(dtype))


def _ppo_batch(b, t, width, vocab, dtype):
    hidden = torch.randn(b, t, width).to(dtype)
    weight = (torch.randn(vocab, width) / width**0.5 * 3).to(dtype)
    labels = torch.randint(0, vocab, (b, t))
    mask = torch.rand(b, t) > 0.3
    old = (torch.randn(b, t) * 0.3 - 1.0).to(dtype)
    adv = torch.randn(b, t).to(dtype)
    ref_logp = (torch.randn(b, t) * 0.3 - 1.0).to(dtype)
    return hidden, weight, labels, old, adv, mask, ref_logp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0])
def test_fused_ppo_matches_fp64(backend, dtype, level, softcap):
    hidden, weight, labels, old, adv, mask, ref_logp = _ppo_batch(3, 7, 12, 41, dtype)
    kw = dict(clip=PPOClip(0.2, 0.28, 3.0, level=level), agg="seq-mean-token-mean", entropy_coef=0.01,
              temperature=0.9, top_k=6, top_p=0.85, softcap=softcap)
    dev = DEVICE if backend == "triton" else "cpu"
    h, w = hidden.to(dev).requires_grad_(True), weight.to(dev).requires_grad_(True)
    with use_backend(backend):
        loss, stats = ppo_loss_from_hidden(h, w, *(t.to(dev) for t in (labels, old, adv, mask)),
                                           kl=KLTerm(ref_logp.to(dev), 0.1, "k3"), chunk_size=5, **kw)
    grads = torch.autograd.grad(loss * 1.7, (h, w))
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_loss, ref_stats = reference.ppo_loss_from_hidden(h64, w64, labels, old.double(), adv.double(), mask,
                                                         kl=KLTerm(ref_logp.double(), 0.1, "k3"), **kw)
    ref_grads = torch.autograd.grad(ref_loss * 1.7, (h64, w64))
    t = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), **t)
    torch.testing.assert_close(stats.entropy.cpu().double(), ref_stats["entropy"].detach(), **t)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, **t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_fused_ppo_replay_and_no_cut(backend, softcap):
    _, _, labels, old, adv, mask, _ = _ppo_batch(2, 9, 8, 37, torch.float32)
    hidden = torch.randint(-2, 3, (2, 9, 8)).float()  # small integers: the logits are exact in any chunking
    weight = torch.randint(-2, 3, (37, 8)).float()
    dev = DEVICE if backend == "triton" else "cpu"
    hidden, weight, labels, old, adv, mask = (t.to(dev) for t in (hidden, weight, labels, old, adv, mask))
    kw = dict(temperature=0.5, entropy_coef=0.1, chunk_size=4, softcap=softcap)
    with use_backend(backend):
        base = ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, **kw)
        off = ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, top_k=37, top_p=1.0, **kw)
        assert torch.equal(base[0], off[0]) and torch.equal(base[1].entropy, off[1].entropy)
        rec = ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, top_k=5, top_p=0.7, **kw)
        thr = support_threshold(hidden @ weight.t(), temperature=0.5, top_k=5, top_p=0.7,
                                softcap=softcap)  # the rollout's record
        rep = ppo_loss_from_hidden(hidden, weight, labels, old, adv, mask, support="replay", support_threshold=thr,
                                   **kw)
    assert torch.equal(rec[0], rep[0]) and torch.equal(rec[1].entropy, rep[1].entropy)
    assert not math.isclose(float(rec[0]), float(base[0]))
