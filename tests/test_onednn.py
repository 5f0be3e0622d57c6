"""oneDNN's linear on a reordered weight (`rlhf_fast.ops._onednn`): where it applies, that it equals the plain GEMM
to fp32 rounding, that the chunked lm_head's vocab blocks stay batch-invariant through it and never reorder the whole
weight, and that the rollout's decode steps use it inside `packed_head` only."""
import pytest
import torch

from rlhf_fast.models import from_hf
from rlhf_fast.ops import _linear_chunked as lc
from rlhf_fast.ops import _onednn as onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def small_weights_pay(monkeypatch):
    """The tests' small weights take the oneDNN path (in use it starts at MIN_ELEMENTS)."""
    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 1)


def test_pack_applies_to_large_fp32_cpu_weights_only(monkeypatch):
    w = torch.randn(300, 24)
    assert onednn.pack(w, 64) is not None
    assert onednn.pack(w.double(), 64) is None and onednn.pack(w.bfloat16(), 64) is None
    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 300 * 24 + 1)
    assert onednn.pack(w, 64) is None


@pytest.mark.parametrize("rows", [1, 7, 64, 257])
def test_linear_equals_the_gemm(rows):
    w, b, x = torch.randn(1001, 40), torch.randn(1001), torch.randn(rows, 40)
    torch.testing.assert_close(onednn.linear(x, onednn.pack(w, rows), b), x @ w.T + b, atol=1e-4, rtol=1e-5)


def test_vocab_blocks_go_through_onednn_match_and_stay_batch_invariant(monkeypatch):
    monkeypatch.setattr(lc, "BLOCK_ELEMENTS", 300 * 32)  # 503 rows: blocks of 300 and 203
    h, w, b = torch.randn(700, 32), torch.randn(503, 32), torch.randn(503)
    reordered = []
    real = onednn.reorder
    monkeypatch.setattr(onednn, "reorder", lambda wb, r: reordered.append(tuple(wb.shape)) or real(wb, r))
    tiles = [(v0, t0, rows, lg.clone()) for v0, t0, rows, _, lg in lc.iter_blocks(h, w, b)]
    assert reordered == [(300, 32), (203, 32)]  # one reorder per block, never the whole weight
    assert [lg.shape for *_, lg in tiles] == [(lc.BLOCK_TILE, 300)] * 3 + [(lc.BLOCK_TILE, 203)] * 3
    got = torch.cat([torch.cat([lg[:rows] for v, _, rows, lg in tiles if v == v0]) for v0 in (0, 300)], 1)
    torch.testing.assert_close(got, h @ w.T + b, atol=1e-4, rtol=1e-5)
    alone = [lg for *_, lg in lc.iter_blocks(h[600:601], w, b)]  # a row's logits do not depend on its tile mates
    assert torch.equal(torch.cat([alone[0][0], alone[1][0]]), got[600])


def test_decode_logits_use_the_packed_head_inside_the_block_only(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=900, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    lm, h = from_hf(model), torch.randn(5, 32)
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    plain = lm.logits(h, False)
    with lm.packed_head(5):
        packed = lm.logits(h, False)
        exact = lm.logits(h, True)  # deterministic mode keeps its fixed-chunk GEMM
    assert len(calls) == 1 and lm._packed_head is None
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exact, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_elements", [1 << 22, 300 * 24])  # one vocab block; blocks of 300, 300, 300, 117
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_chunked_logprobs_through_onednn_match_float64(monkeypatch, block_elements, softcap):
    """The op the oneDNN blocks serve, `linear_token_logprobs` (fp32, CPU), against its float64 reference: log-probs,
    entropy and the gradients of hidden, weight and bias, with ignored labels, an odd row count, a temperature and
    (second case) labels in every vocab block, merged across blocks, with and without the final logit soft-cap;
    bitwise batch-invariant."""
    from rlhf_fast.ops import linear_token_logprobs, reference, use_backend

    monkeypatch.setattr(lc, "BLOCK_ELEMENTS", block_elements)
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(301, 24, generator=g), torch.randn(1017, 24, generator=g) / 3
    bias, labels = torch.randn(1017, generator=g) * 0.5, torch.randint(0, 1017, (301,), generator=g)
    labels[::5] = -100
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    refs = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    kw = dict(return_entropy=True, temperature=0.7, softcap=softcap)
    with use_backend("native"):
        logp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
        assert calls, "the chunked path did not go through oneDNN"
        for rows in (slice(40, 41), slice(37, 300)):
            lp, en = linear_token_logprobs(hidden[rows], weight, labels[rows], bias=bias, **kw)
            assert torch.equal(lp, logp[rows].detach()) and torch.equal(en, ent[rows].detach())
    rlogp, rent = reference.linear_token_logprobs(refs[0], refs[1], labels, bias=refs[2], **kw)
    torch.testing.assert_close(logp.double(), rlogp.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=2e-5, rtol=1e-5)
    (logp.sum() + ent.sum()).backward()
    (rlogp.sum() + rent.sum()).backward()
    for a, b in zip(leaves, refs):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_truncated_support_and_the_torch_rows_keep_the_row_chunks(monkeypatch):
    """The vocab blocks need the native row kernels and the whole row's support: a truncated support (top-k) or the
    torch row kernels take the fixed row tiles through MKL, and no oneDNN reorder is made."""
    from rlhf_fast.ops import linear_token_logprobs, use_backend

    monkeypatch.setattr(onednn, "reorder", lambda *a: pytest.fail("reordered"))
    hidden, weight, labels = torch.randn(9, 24), torch.randn(517, 24), torch.randint(0, 517, (9,))
    with use_backend("native"):
        linear_token_logprobs(hidden, weight, labels, top_k=5)
    with use_backend("torch"):
        linear_token_logprobs(hidden, weight, labels)
    assert not lc.use_blocks(weight.double(), "native", False) and lc.use_blocks(weight, "native", False)


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    torch.manual_seed(0)
    return cls[1](cls[0](vocab_size=300, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])  # qwen2: q/k/v biases fused too
def test_packed_projections_match_the_plain_forward_and_leave_nothing(monkeypatch, kind):
    """Inside `packed_projections` the blocks run q/k/v and gate/up as one oneDNN call each and o/down on their own
    copies: the hidden states equal the plain forward's to fp32 rounding; deterministic mode keeps its GEMMs; nothing
    stays on the modules after the block."""
    from rlhf_fast.models import packed_weights as pw
    from rlhf_fast.models.layers import cache_attention
    from rlhf_fast.rollout import block_table

    monkeypatch.setattr(pw, "MIN_ELEMENTS", 1)
    lm = from_hf(_tiny(kind))
    inputs = block_table.prefill_inputs([[5, 6, 7, 8, 9], [3, 2, 1]], None, 16, torch.device("cpu"),
                                          deterministic=False)
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda x, w, b=None: calls.append(w.shape) or real(x, w, b))

    def hidden(det):
        with torch.no_grad():
            return lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, None), det)

    plain = hidden(False)
    assert not calls
    with pw.packed_projections(lm, 8):
        packed, exact = hidden(False), hidden(True)
    assert len(calls) == 2 * 4  # per block: qkv, o, gate_up, down
    assert sorted({tuple(s) for s in calls}) == sorted({(32 + 2 * 16, 32), (32, 32), (2 * 56, 32), (32, 56)})
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exact, plain, atol=1e-5, rtol=1e-5)
    assert len(calls) == 8  # deterministic mode called none
    assert not any(pw._ATTR in m.__dict__ for m in lm.modules())


def test_packed_projections_skip_adapters_and_hooked_layers(monkeypatch):
    """A LoRA-adapted projection (ours or peft's) and a Linear with hooks on it run as before: they get no copy, and
    nor does a fused group that holds one of them."""
    from rlhf_fast.config import LoRAConfig
    from rlhf_fast.models import lora
    from rlhf_fast.models import packed_weights as pw

    monkeypatch.setattr(pw, "MIN_ELEMENTS", 1)
    lm = from_hf(_tiny("llama"))
    lora.apply_lora(lm, LoRAConfig(r=4, target_modules="q_proj"))
    lm.layers[1].mlp.down_proj.register_forward_hook(lambda *a: None)
    with pw.packed_projections(lm, 8):
        packed = {n for n, m in lm.named_modules() if pw._ATTR in m.__dict__}
        assert all(set(m.__dict__[pw._ATTR]) == ({"gate_up"} if n.endswith("mlp") else {""})
                   for n, m in lm.named_modules() if n in packed)
    # q is adapted: no qkv group, k and v packed on their own; layer 1's down is hooked
    assert packed == {f"layers.{i}.{p}" for i in (0, 1) for p in ("attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp")} \
        | {"layers.0.mlp.down_proj"}


@pytest.mark.parametrize("compile", [False, True])
def test_engine_decodes_on_the_packed_projections(monkeypatch, compile):
    """`RolloutEngine.generate` runs its steps on the oneDNN copies (eager, and inside the compiled decode step):
    greedy tokens equal the plain engine's and log-probs agree to fp32 rounding; the copies are gone afterwards."""
    from rlhf_fast.models import packed_weights as pw
    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    lm = from_hf(_tiny("qwen2"))
    prompts = [[5, 6, 7, 8, 9], [3, 2, 1], [7] * 11]
    sp = SamplingParams(max_new_tokens=6, temperature=0)
    monkeypatch.setattr(pw, "MIN_ELEMENTS", 1 << 40)
    plain = RolloutEngine(lm, compile=compile).generate(prompts, sp)
    monkeypatch.setattr(pw, "MIN_ELEMENTS", 1)
    seen = []
    real = pw.fused
    monkeypatch.setattr(pw, "fused", lambda m, name, x, det: seen.append(name) or real(m, name, x, det))
    engine = RolloutEngine(lm, compile=compile)
    packed = engine.generate(prompts, sp)
    assert {"qkv", "gate_up", ""} <= set(seen)
    if compile:  # the compiled step calls oneDNN directly (no custom-op dispatch); inductor's own lowering is back
        from torch._inductor import lowering

        assert engine.decode_step.onednn_direct_calls >= 4 * lm.num_layers
        assert torch.ops.mkldnn._linear_pointwise.default in lowering.lowerings
    assert [c.token_ids for c in packed] == [c.token_ids for c in plain]
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    assert not any(pw._ATTR in m.__dict__ for m in lm.modules())
