"""Tensor parallelism at one rank (this process): the vocab-parallel ops of `rlhf_fast.ops.vocab_parallel` against
`ops.reference` / `F.embedding` / the fused ops in float64 (odd shapes, several chunks, ignored rows, bias,
temperature, entropy, autocast ignored), `head_logprobs` / `head_ppo_loss` on a plain lm_head being the fused op, the
split PPO step equal to `ops.ppo_loss_from_hidden` in float64 over its option sets, and the one-line refusals of
`parallelize.tensor_parallel` and the configs (tp not dividing the world, the heads or the vocabulary; GPT-2, LoRA,
a root whose head is not scalar; PPO under tp with top-k / top-p or LoRA). The torchrun worlds are in
`tests/test_tensor_parallel.py`.
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from rlhf_fast import distributed as dist
from rlhf_fast import ops
from rlhf_fast import parallelize as par
from rlhf_fast.config import ConfigError, LoRAConfig, ParallelConfig, PPOConfig, RMConfig
from rlhf_fast.ops import reference
from rlhf_fast.ops.vocab_parallel import (head_logprobs, head_ppo_loss, vocab_parallel_embedding,
                                          vocab_parallel_logprobs, vocab_parallel_ppo_loss)
from tests import _tp_worker as worker


# --- one process -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,vocab,width,chunk", [(41, 341, 17, None), (7, 33, 5, 4), (1, 5, 3, 2), (64, 97, 8, 50)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_vocab_parallel_logprobs_one_rank(n, vocab, width, chunk, dtype, tol):
    """At a group of one rank (no collective) the op is the reference's log-probs and entropy, forward and
    backward, with a bias, temperature 0.7 and every third row ignored (log-prob 0, no gradient)."""
    g = torch.Generator().manual_seed(n + vocab)
    h = torch.randn(n, width, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(vocab, width, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(vocab, dtype=dtype, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = -100
    gl, ge = torch.randn(n, dtype=dtype, generator=g), torch.randn(n, dtype=dtype, generator=g)
    lp, ent = vocab_parallel_logprobs(h, w, labels, bias=b, temperature=0.7, return_entropy=True, chunk_size=chunk)
    got = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, w, b))
    want_lp, want_ent = reference.linear_token_logprobs(h.double(), w.double(), labels, bias=b.double(),
                                                        temperature=0.7, return_entropy=True)
    want = torch.autograd.grad((want_lp * gl.double()).sum() + (want_ent * ge.double()).sum(), (h, w, b))
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool((lp[::3] == 0).all()) and bool((ent[::3] == 0).all())
    for x, y in zip((lp, ent, *got), (want_lp, want_ent, *want)):
        assert float((x.double() - y).detach().abs().max()) <= tol * max(1.0, float(y.detach().abs().max()))


def test_vocab_parallel_logprobs_ignore_autocast():
    """Under bf16 autocast (a stage's mixed_precision, the loss's backward inside it) fp32 hidden states and weight
    give the fp32 log-probs, entropy and gradients bitwise, as the fused ops do; bf16 hidden states with an fp32
    weight are scored (the weight's chunks cast), gradients in each input's dtype."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (9,), generator=g)
    outs = []
    for on in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            lp, ent = vocab_parallel_logprobs(h, w, labels, return_entropy=True, chunk_size=5)
            outs.append((lp, ent, *torch.autograd.grad(lp.sum() + ent.sum(), (h, w))))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = vocab_parallel_logprobs(h.to(torch.bfloat16), w, labels)
        gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    assert lp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    assert float((lp - outs[0][0]).abs().max()) < 0.05


def test_vocab_parallel_embedding_one_rank():
    """At one rank: `F.embedding` with its padding row, forward and backward (repeated ids accumulate)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([3, 0, 12, 3, 5, 0, 3])
    out = vocab_parallel_embedding(ids, w, padding_idx=0)
    ref = torch.nn.functional.embedding(ids, w, padding_idx=0)
    assert torch.equal(out, ref)
    go = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (a,), (b,) = torch.autograd.grad(out, w, go), torch.autograd.grad(ref, w, go)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert bool((a[0] == 0).all())


def test_head_logprobs_plain_head_is_the_fused_op():
    """An lm_head that is not split: `head_logprobs` is `ops.linear_token_logprobs` on its weight, bitwise."""
    from rlhf_fast import ops

    head = torch.nn.Linear(8, 19, bias=True)
    h, labels = torch.randn(5, 8), torch.tensor([3, -100, 18, 0, 7])
    got = head_logprobs(h, head, labels, return_entropy=True)
    want = ops.linear_token_logprobs(h, head.weight, labels, bias=head.bias, return_entropy=True)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


PPO_OPTIONS = {  # name -> ppo_loss_from_hidden options: the terms and token selections the split step must match
    "plain": {},
    "kl_entropy_seq_mean": dict(kl=("k3", 0.3), entropy_coef=0.1, agg="seq-mean-token-mean"),
    "gspo_is_weights": dict(clip=ops.PPOClip(0.2, level="sequence"), is_weights=True),
    "sequence_sum_dual": dict(clip=ops.PPOClip(0.1, dual=3.0, level="sequence-sum"), agg="seq-mean-token-sum"),
    "rollout_tis_temperature": dict(rollout=True, temperature=0.7, kl=("k1", 0.2), entropy_coef=0.05,
                                    agg=ops.PPOAgg("token-mean", num_tokens=40)),
    "on_policy_token_stats": dict(on_policy=True, kl=("k2", 0.1), entropy_coef=0.1, token_stats=True),
    "on_policy_sequence": dict(on_policy=True, clip=ops.PPOClip(0.2, level="sequence")),
}


@pytest.mark.parametrize("name", list(PPO_OPTIONS))
def test_vocab_parallel_ppo_loss_one_rank(name):
    """At a group of one rank the split PPO step (`vocab_parallel_ppo_loss`) is `ops.ppo_loss_from_hidden` in
    float64: the loss, every stat and the gradients of hidden, weight and bias, for each option set (KL in the loss,
    entropy bonus, sequence-level ratios, importance weights, rollout correction, temperature, global token count),
    with a NaN old_logp (dropped, counted), an empty row and (batch,) advantages in one case; the on-policy step
    (old_logp=None) and the per-token stats (token_stats=True)."""
    g = torch.Generator().manual_seed(len(name))
    opts = dict(PPO_OPTIONS[name])
    b, t, width, vocab = 5, 9, 6, 37
    h, w, bias = (torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
                  for shape in ((b, t, width), (vocab, width), (vocab,)))
    labels = torch.randint(0, vocab, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.8).double()
    mask[2], mask[0, 1] = 0, 1
    old = 0.1 * torch.randn(b, t, dtype=torch.float64, generator=g) - 3
    old[0, 1] = float("nan")  # a valid token with a NaN input: dropped and counted
    adv = torch.randn(b if name == "gspo_is_weights" else (b, t), dtype=torch.float64, generator=g)
    if "kl" in opts:
        kind, coef = opts.pop("kl")
        opts["kl"] = ops.KLTerm(0.1 * torch.randn(b, t, dtype=torch.float64, generator=g) - 3, coef, kind)
    if opts.pop("is_weights", False):
        opts["is_weights"] = torch.rand(b, t, dtype=torch.float64, generator=g)
    if opts.pop("on_policy", False):
        old, adv[0, 1] = None, float("nan")  # still a dropped token: a NaN advantage
    if opts.pop("rollout", False):
        opts.update(rollout_logp=old + 0.05 * torch.randn(b, t, dtype=torch.float64, generator=g),
                    rollout_correction=ops.RolloutCorrection(mode="tis"))
    want, wst = ops.ppo_loss_from_hidden(h, w, labels, old, adv, mask, bias=bias, **opts)
    gw = torch.autograd.grad(want, (h, w, bias))
    got, st = vocab_parallel_ppo_loss(h, w, labels, old, adv, mask, bias=bias, **opts)
    gg = torch.autograd.grad(got, (h, w, bias))
    scale = max(1.0, abs(float(want.detach())))
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-12 * scale
    for f in ("policy_loss", "kl", "entropy", "clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max",
              "nonfinite"):
        a, c = getattr(st, f), getattr(wst, f)
        assert abs(float(a) - float(c)) <= 1e-12 * max(1.0, abs(float(c))), (f, float(a), float(c))
    assert int(st.nonfinite) == int(wst.nonfinite) >= 1
    assert (st.rollout_correction is None) == (wst.rollout_correction is None)
    for x, y in zip(gg, gw):
        assert float((x - y).abs().max()) <= 1e-12 * max(1.0, float(y.abs().max()))
    assert (st.token_logp is None) == (wst.token_logp is None) == (not opts.get("token_stats"))
    if opts.get("token_stats"):
        for x, y in ((st.token_logp, wst.token_logp), (st.token_entropy, wst.token_entropy)):
            assert float((x - y).abs().max()) <= 1e-12 * max(1.0, float(y.abs().max()))


def test_head_ppo_loss_plain_head_is_the_fused_op():
    """An lm_head that is not split: `head_ppo_loss` is `ops.ppo_loss_from_hidden` on its weight and bias, bitwise;
    the split step refuses a soft-cap and top-k / top-p in one line each."""
    head = torch.nn.Linear(8, 19, bias=True)
    h, labels = torch.randn(2, 3, 8), torch.randint(0, 19, (2, 3))
    old, adv, mask = torch.randn(2, 3) - 3, torch.randn(2, 3), torch.ones(2, 3)
    got, st = head_ppo_loss(h, head, labels, old, adv, mask, entropy_coef=0.1)
    want, wst = ops.ppo_loss_from_hidden(h, head.weight, labels, old, adv, mask, bias=head.bias, entropy_coef=0.1)
    assert torch.equal(got, want) and torch.equal(st.entropy, wst.entropy)
    for kw, what in ((dict(softcap=30.0), "softcap=30.0"), (dict(top_k=5), "top_k=5"), (dict(top_p=0.9), "top_p")):
        with pytest.raises(NotImplementedError, match=what) as e:
            vocab_parallel_ppo_loss(h, head.weight, labels, old, adv, mask, **kw)
        assert "\n" not in str(e.value)


def test_refusals():
    """One line each: tp not dividing the world size, the heads, kv heads or vocabulary; models the split does not
    cover (GPT-2, LoRA projections, a GPT-2 scalar-head root, a root whose head is not Linear(hidden, 1) or whose
    backbone keeps an lm_head); PPO configs under tp with top-k / top-p sampling or LoRA; bad tp values. A
    scalar-head model's backbone is what tp splits, and RM and PPO configs take tp."""
    from rlhf_fast.models import build_model
    from rlhf_fast.models.lora import apply_lora
    from tests._parallelize_worker import HeadModel, tiny_model

    with pytest.raises(dist.DistributedError, match="does not divide the world size 1"):
        par.parallelize(worker.tiny_model("llama"), tp=2)
    three = types.SimpleNamespace(size=lambda: 3)
    with pytest.raises(ConfigError, match=r"^parallel.tp: 3 must divide the model's num_heads 4, num_kv_heads 2, "
                                          r"vocab_size 64$"):
        par.tensor_parallel(worker.tiny_model("llama"), three)
    two = types.SimpleNamespace(size=lambda: 2)
    lora = worker.tiny_model("llama")
    apply_lora(lora, LoRAConfig(r=2), seed=0)
    gpt2_root = HeadModel(tiny_model("gpt2"))
    gpt2_root.lm.lm_head = None
    for model in (tiny_model("gpt2"), lora, gpt2_root):
        with pytest.raises(ConfigError, match="Llama families") as e:
            par.tensor_parallel(model, two)
        assert "\n" not in str(e.value)
    wide = HeadModel(build_model(worker.config(False), lm_head=False, device="cpu"))
    wide.head = torch.nn.Linear(32, 3)
    with_lm_head = HeadModel(worker.tiny_model("llama"))
    for model in (wide, with_lm_head):
        with pytest.raises(ConfigError, match=r"^parallel.tp: a model holding a backbone as `.lm` splits only as a "
                                              r"scalar-head model") as e:
            par.tensor_parallel(model, two)
        assert "\n" not in str(e.value)
    rm = worker.scalar_model()  # a scalar-head model: its backbone is what tp splits
    assert par._check_tp(rm, 2) is rm.lm
    assert RMConfig(parallel=ParallelConfig(tp=2)).parallel.tp == 2
    assert PPOConfig(parallel=ParallelConfig(tp=2)).parallel.tp == 2
    cut = dataclasses.replace(PPOConfig().sampling, top_k=5)
    for kw, what in ((dict(sampling=cut), r"sampling.top_k=5 / top_p=1.0 \(a truncated one\)"),
                     (dict(lora=LoRAConfig(r=2)), r"LoRA adapters \(lora.r=2\) are not split")):
        with pytest.raises(ConfigError, match=rf"^parallel.tp: 2 .*{what}") as e:
            PPOConfig(parallel=ParallelConfig(tp=2), **kw)
        assert "\n" not in str(e.value)
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="tp: must be an integer >= 1"):
            ParallelConfig(tp=bad)
    with pytest.raises(TypeError, match="tp must be an int"):
        par.ParallelSpec(tp=0)
