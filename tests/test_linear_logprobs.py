"""linear_token_logprobs: the chunked and Triton paths against the float64 naive path, gradients of hidden, weight
and bias, batch invariance (bitwise) and bad input; with and without the final logit soft-cap (softcap), which a tiny
Gemma 2 from transformers checks end to end."""
import functools

import pytest
import torch
from conftest import tol
from hypothesis import given, settings
from hypothesis import strategies as st

from _backends import DEVICE, LOGPROB_BACKENDS, needs_triton

from rlhf_fast import _native
from rlhf_fast.ops import linear_token_logprobs, reference, token_logprobs, use_backend

BACKENDS = LOGPROB_BACKENDS
TRITON = needs_triton("linear_token_logprobs")
SOFTCAPS = (0.0, 30.0, 2.0)  # off; barely bending logits of this scale; saturating most of them


def _inputs(lead, width, vocab, dtype, *, bias=True, ignore_frac=0.25, device="cpu"):
    hidden = torch.randn(*lead, width, device=device).to(dtype)
    weight = (torch.randn(vocab, width, device=device) / width**0.5 * 2).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead, device=device)
    labels[torch.rand(lead, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def _check(hidden, weight, bias, labels, *, temperature=1.0, chunk_size=None, grad_tol_scale=4.0, softcap=0.0):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    logp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
                                      temperature=temperature, return_entropy=True, chunk_size=chunk_size,
                                      softcap=softcap)
    ref_logp, ref_ent = reference.linear_token_logprobs(refs[0], refs[1], labels,
                                                        bias=refs[2] if bias is not None else None,
                                                        temperature=temperature, return_entropy=True, softcap=softcap)
    t = tol(hidden.dtype)
    # 16-bit logits are rounded once (as nn.Linear would), so compare with a looser, dtype-scaled tolerance.
    scale = 1.0 if hidden.dtype in (torch.float32, torch.float64) else 4.0
    assert logp.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=t["atol"] * scale, rtol=t["rtol"] * scale)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=t["atol"] * scale, rtol=t["rtol"] * scale)
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    grads = torch.autograd.grad((logp * g1.to(logp.dtype)).sum() + (ent * g2.to(ent.dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_logp * g1).sum() + (ref_ent * g2).sum(), refs)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == hidden.dtype and g.shape == r.shape, name
        s = scale * grad_tol_scale
        torch.testing.assert_close(g.double(), r, atol=t["atol"] * s, rtol=t["rtol"] * s, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead,width,vocab", [((5,), 8, 1), ((3, 50), 16, 7), ((130,), 24, 4231)])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_matches_fp64(backend, dtype, lead, width, vocab, softcap):
    hidden, weight, bias, labels = _inputs(lead, width, vocab, dtype, bias=vocab != 7)
    with use_backend(backend):
        _check(hidden, weight, bias, labels, temperature=0.6, chunk_size=70, softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_fp16(backend):
    hidden, weight, bias, labels = _inputs((2, 9), 32, 32011, torch.float16, bias=False)
    with use_backend(backend):
        _check(hidden, weight, bias, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    with use_backend(backend):
        for lead in [(0,), (3, 0), (4, 5)]:
            hidden, weight, bias, labels = _inputs(lead, 8, 11, torch.float32)
            labels.fill_(-100)
            leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
            logp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
            assert logp.shape == lead and torch.equal(logp, torch.zeros(lead)) and torch.equal(ent, torch.zeros(lead))
            grads = torch.autograd.grad((logp + ent).sum(), leaves)
            assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, leaves))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_batch_invariance(backend, dtype, softcap):
    """The same row gives bitwise the same log-prob and entropy in any batch, at any position, for any chunk size.
    (Promised by the native backend; the torch fallback's elementwise exp may round a tail element differently, so
    for it the check is closeness.)"""
    same = torch.equal if backend == "native" else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6))
    hidden, weight, bias, labels = _inputs((200,), 64, 1000, dtype, ignore_frac=0.0)
    with use_backend(backend):
        base_lp, base_ent = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                                  softcap=softcap)
        probes = [
            (slice(0, 1), None), (slice(63, 66), None), (slice(10, 200), 64), (slice(0, 200), 1), (slice(7, 150), 100)
        ]
        for rows, chunk in probes:
            lp, ent = linear_token_logprobs(hidden[rows].clone(), weight, labels[rows].clone(), bias=bias,
                                            return_entropy=True, chunk_size=chunk, softcap=softcap)
            assert same(lp, base_lp[rows]) and same(ent, base_ent[rows]), (rows, chunk)
        perm = torch.randperm(200)
        ignored = labels[perm].clone()
        ignored[::3] = -100  # ignored rows shift every other row's position in the gathered batch
        lp, ent = linear_token_logprobs(hidden[perm], weight, ignored, bias=bias, return_entropy=True, chunk_size=128,
                                        softcap=softcap)
        keep = ignored != -100
        assert same(lp[keep], base_lp[perm][keep]) and same(ent[keep], base_ent[perm][keep])
        other = torch.randn(2, 100, 64).to(dtype)  # the row embedded in a different batch of another shape
        other[1, 37] = hidden[5]
        lbl = torch.randint(0, 1000, (2, 100))
        lbl[1, 37] = labels[5]
        lp = linear_token_logprobs(other, weight, lbl, bias=bias, softcap=softcap)
        assert same(lp[1, 37], base_lp[5])


@functools.cache
def _pool():
    """300 fixed rows and their log-probs computed as one batch (native backend)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 48, generator=gen)
    weight = torch.randn(777, 48, generator=gen) / 7
    labels = torch.randint(0, 777, (300,), generator=gen)
    with use_backend("native"):
        return hidden, weight, labels, linear_token_logprobs(hidden, weight, labels, return_entropy=True)


@pytest.mark.skipif(not _native.has("token_logprobs_fwd_cpu"), reason="rlhf_fast._C not built with logprobs")
@settings(max_examples=15, deadline=None)
@given(start=st.integers(0, 299), n=st.integers(1, 300), pad_front=st.integers(0, 70),
       chunk=st.one_of(st.none(), st.integers(1, 700)), ignore_every=st.integers(0, 5))
def test_batch_invariance_property(start, n, pad_front, chunk, ignore_every):
    """Any window of the pool, shifted by unrelated rows, some rows ignored, any chunk size: bitwise equal."""
    hidden, weight, labels, (base_lp, base_ent) = _pool()
    rows = torch.arange(start, min(start + n, 300))
    filler = torch.randn(pad_front, 48)
    h = torch.cat([filler, hidden[rows]])
    y = torch.cat([torch.randint(0, 777, (pad_front,)), labels[rows]])
    if ignore_every:
        y[::ignore_every + 1] = -100
    with use_backend("native"):
        lp, ent = linear_token_logprobs(h, weight, y, return_entropy=True, chunk_size=chunk)
    keep = y[pad_front:] != -100
    assert torch.equal(lp[pad_front:][keep], base_lp[rows][keep])
    assert torch.equal(ent[pad_front:][keep], base_ent[rows][keep])


def test_frozen_weight_only_hidden_grad():
    hidden, weight, bias, labels = _inputs((10,), 8, 13, torch.float32)
    h = hidden.requires_grad_(True)
    logp = linear_token_logprobs(h, weight, labels, bias=bias)
    (dh,) = torch.autograd.grad(logp.sum(), h)
    h64 = hidden.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(reference.linear_token_logprobs(h64, weight.double(), labels,
                                                                 bias=bias.double()).sum(), h64)
    torch.testing.assert_close(dh.double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_input():
    hidden, weight, bias, labels = _inputs((4,), 8, 10, torch.float32)
    with pytest.raises(ValueError, match="labels must be in"):
        linear_token_logprobs(hidden, weight, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        linear_token_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_token_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_token_logprobs(hidden, weight, labels, bias=bias[:9])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="hidden must have dtype"):
        linear_token_logprobs(hidden.int(), weight, labels)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_token_logprobs(hidden, weight[0], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(hidden, weight, labels, temperature=-1.0)
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        linear_token_logprobs(hidden, weight.to("meta"), labels)
    for bad in (-30.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            linear_token_logprobs(hidden, weight, labels, softcap=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma2_final_logit_softcapping(backend):
    """A tiny Gemma 2 from transformers: its logits are soft-capped (final_logit_softcapping) before any temperature;
    the op on its last hidden states and lm_head with that softcap gives log_softmax(logits / T) of its own capped
    logits, and so does the sampled-support path (top-k on the capped, tempered logits)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.5)
    model = Gemma2ForCausalLM(cfg).double().eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # logits of several units: the cap bends them
    ids = torch.randint(0, 301, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits  # (2, 9, V), capped by transformers
        hidden = model.model(ids).last_hidden_state  # (2, 9, H)
    labels = torch.randint(0, 301, (2, 9))
    assert logits.abs().max() < 2.5 and (hidden @ model.lm_head.weight.t()).abs().max() > 3.0
    want = (logits / 0.7).log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    want_k = token_logprobs(logits, labels, temperature=0.7, top_k=20)
    with use_backend(backend):
        got = linear_token_logprobs(hidden.float(), model.lm_head.weight.float(), labels, temperature=0.7,
                                    softcap=cfg.final_logit_softcapping)
        got_k = linear_token_logprobs(hidden.float(), model.lm_head.weight.float(), labels, temperature=0.7, top_k=20,
                                      softcap=cfg.final_logit_softcapping)
    torch.testing.assert_close(got.double(), want, **tol(torch.float32))
    torch.testing.assert_close(got_k.double(), want_k, **tol(torch.float32))


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,width,vocab", [((3,), 16, 7), ((2, 5), 32, 150)])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_triton_matches_fp64(dtype, lead, width, vocab, softcap):
    hidden, weight, bias, labels = _inputs(lead, width, vocab, dtype, device=DEVICE)
    with use_backend("triton"):
        _check(hidden, weight, bias, labels, temperature=0.9, chunk_size=4, softcap=softcap)


@TRITON
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_triton_batch_invariance(softcap):
    hidden, weight, bias, labels = _inputs((12,), 16, 70, torch.float32, ignore_frac=0.0, device=DEVICE)
    with use_backend("triton"):
        base_lp, base_ent = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                                  softcap=softcap)
        lp, ent = linear_token_logprobs(hidden[5:9].clone(), weight, labels[5:9].clone(), bias=bias,
                                        return_entropy=True, chunk_size=2, softcap=softcap)
        empty = linear_token_logprobs(hidden[:0], weight, labels[:0])
    assert torch.equal(lp, base_lp[5:9]) and torch.equal(ent, base_ent[5:9]) and empty.shape == (0,)
