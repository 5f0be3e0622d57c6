"""Mixtral and Qwen3-MoE as rlhf_fast's own models (`models.mixtral`, `models.moe`) against transformers' forward and
generate (tiny random configs, fp32, CPU): logits, greedy tokens, the packed training forward and its gradients, the
checkpoint round trip (experts stacked on load, written one by one on export); the grouped expert GEMMs; routing
replay (a replayed record is bitwise its forward; a perturbed router keeps the recorded experts and reports the
flips) and the router load-balancing loss against transformers' `load_balancing_loss_func`."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file

from rlhf_fast.models import build_model, covered_families, from_hf, load_model, moe
from rlhf_fast.models.layers import activation, cache_attention
from rlhf_fast.models.moe import RoutingRecord
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.models.state_dict_adapter import from_hf_name, save_pretrained
from rlhf_fast.parallelize import parallelize
from rlhf_fast.rollout import RolloutEngine, SamplingParams, block_table, teacher_forced_logprobs

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    # a window of 7 on every layer: the prompts and generations run past it
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=7, **SMALL),
    # experts 24 wide: the grouped GEMM (`grouped_mm`); layer 1 dense (mlp_only_layers)
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(head_dim=8, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
                                           norm_topk_prob=True, mlp_only_layers=[1], **SMALL),
    # no renormalisation, k = 3, experts 18 wide (rows not 16-byte aligned: one GEMM per expert); layers 0, 2 dense
    "qwen3_moe_unnormed": lambda: tf.Qwen3MoeConfig(head_dim=8, num_experts=6, num_experts_per_tok=3,
                                                    moe_intermediate_size=18, norm_topk_prob=False,
                                                    decoder_sparse_step=2, attention_bias=True, **SMALL),
}
FAMILIES = list(CONFIGS)
PROMPTS = [[1, 5, 7], list(range(9, 39)), [3] * 20, [60, 2, 44, 9, 61, 62, 63, 5, 6, 70, 71]]  # 3, 30, 20, 11


def hf_model(family: str, dtype=torch.float32):
    """A tiny random transformers model of `family`, every parameter perturbed (HF starts norms at 1); its experts
    run as transformers' eager loop over experts (the oracle; its grouped_mm path needs 16-byte rows)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (HF model, its directory saved by transformers, our model loaded from it)}, built on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            hf = hf_model(family)
            path = tmp_path_factory.mktemp(family) / "hf"
            hf.save_pretrained(str(path))
            cache[family] = (hf, path, load_model(path))
        return cache[family]
    return get


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def forward(lm, seqs, deterministic=False, routing=None, out_rows=None):
    """Final hidden states of `seqs` packed in one prefill (no grad)."""
    inputs = block_table.prefill_inputs(seqs, None, 4, torch.device("cpu"), deterministic=False, logits="all")
    with torch.no_grad():
        return lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, None), deterministic, out_rows,
                  routing=routing)


def test_covered_families_list_the_moe_families():
    assert {"MixtralForCausalLM", "Qwen3MoeForCausalLM"} <= set(covered_families())


def test_dense_layers_and_routing_args_follow_the_config(saved):
    assert saved("qwen3_moe")[2].moe_layers == [0, 2]
    assert saved("qwen3_moe_unnormed")[2].moe_layers == [1]
    assert saved("mixtral")[2].moe_layers == [0, 1, 2] and saved("mixtral")[2].windows == [7, 7, 7]
    assert not saved("qwen3_moe_unnormed")[2].args.renormalise and saved("qwen3_moe")[2].args.renormalise


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf_forward(family, saved):
    hf, _, ours = saved(family)
    ref = torch.cat([hf_logits(hf, s) for s in PROMPTS]).double()
    for lm in (ours, from_hf(hf)):
        for det in (False, True):
            got = lm.logits(forward(lm, PROMPTS, det), det)
            torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_hf_generate(family, saved):
    hf, _, ours = saved(family)
    n = 20
    outs = RolloutEngine(ours, block_size=4).generate(PROMPTS, SamplingParams(max_new_tokens=n, temperature=0))
    for o in outs:
        prompt = PROMPTS[o.prompt_index]
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):]
        ref = ref.tolist()
        if o.token_ids != ref:  # allowed only where HF's two best logits tie within 1e-6
            i = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
            top2 = hf_logits(hf, prompt + ref[:i])[-1].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-6, (o.prompt_index, i)


def hf_hidden(hf, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Right-padded HF backbone forward: (len, hidden) final hidden states of each sequence."""
    ids, att = padded(seqs)
    out = hf.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


def padded(seqs):
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = torch.tensor(s), 1
    return ids, att


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


PACK_PROMPTS = [PROMPTS[1]] * 2 + [PROMPTS[2], PROMPTS[3]]
RESPONSES = [[11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33, 34, 35, 36, 37, 38], [40, 41]]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_training_forward_and_gradients_match_hf(family, saved):
    """The padding-free forward (shared prompts) and its gradients, experts and router included, against HF's
    padded forward (HF holds its experts stacked too: the same tensors under `from_hf_name`)."""
    hf, _, ours = saved(family)
    ours.requires_grad_(True)
    seqs = [p + r for p, r in zip(PACK_PROMPTS, RESPONSES)]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(len(s), hf.config.hidden_size, generator=gen) for s in seqs]
    ref = hf_hidden(hf, seqs)
    g_ref = grads(hf, sum((h * w).sum() for h, w in zip(ref, weights)))
    batch = pack(PACK_PROMPTS, RESPONSES, groups=[0, 0, 1, 2], share_prompts=True)
    h = packed_hidden(ours, batch)
    w_packed = torch.zeros_like(h)
    for i, (ps, pe, rs, re_) in enumerate(batch.samples):
        torch.testing.assert_close(torch.cat((h[ps:pe], h[rs:re_])), ref[i].detach(), atol=1e-5, rtol=1e-5)
        w_packed[rs:re_] += weights[i][pe - ps:]
        w_packed[ps:pe] += weights[i][:pe - ps]  # a shared prompt's rows carry every sample's weight
    g = grads(ours, (h * w_packed).sum())
    assert {from_hf_name(k, hf.config) for k in g_ref} == set(g)
    assert any(".experts." in k for k in g) and any(".router." in k for k in g)
    for name, want in g_ref.items():
        got = g[from_hf_name(name, hf.config)]
        scale = float(want.abs().max())  # fp32 rounding relative to the tensor's scale (sums of many rows' terms)
        torch.testing.assert_close(got, want, atol=1e-6 * scale + 1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_checkpoint_round_trip_is_bitwise(family, dtype, tmp_path):
    """HF checkpoint (experts one by one) -> ours (stacked) -> our export -> `AutoModelForCausalLM`: the same tensors,
    bitwise, written under the very keys transformers' `save_pretrained` writes; a bare backbone too."""
    hf = hf_model(family, dtype)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_model(tmp_path / "hf", dtype=None)
    assert ours.dtype == dtype and ours.layers[0].mlp.experts.gate_up_proj.shape == (
        hf.config.num_experts, 2 * ours.args.expert_size, hf.config.hidden_size)
    save_pretrained(ours, tmp_path / "ours", max_shard_bytes=20_000)  # sharded: experts spread over files
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=dtype)
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == dtype and torch.equal(a[key], b[key]), key
    written = {}
    for f in (tmp_path / "ours").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            written.update({k: st.get_tensor(k) for k in st.keys()})
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as st:
        assert written.keys() == set(st.keys())
        assert all(torch.equal(written[k], st.get_tensor(k)) for k in st.keys())
    backbone = load_model(tmp_path / "hf", dtype=None, backbone=True)
    save_pretrained(backbone, tmp_path / "backbone")
    bare = tf.AutoModel.from_pretrained(str(tmp_path / "backbone"), dtype=dtype)
    assert all(torch.equal(t, hf.base_model.state_dict()[k]) for k, t in bare.state_dict().items())


def test_a_checkpoint_with_stacked_experts_loads_too(tmp_path, saved):
    """A checkpoint holding transformers' in-memory names (`mlp.experts.gate_up_proj`) loads as well; one lacking
    an expert is refused naming the tensor."""
    hf, path, ours = saved("mixtral")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "fused" / "model.safetensors"))
    fused = load_model(tmp_path / "fused")
    assert all(torch.equal(t, ours.state_dict()[k]) for k, t in fused.state_dict().items())
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "config.json").write_text((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        state = {k: st.get_tensor(k) for k in st.keys() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    save_file(state, str(tmp_path / "gap" / "model.safetensors"))
    with pytest.raises(Exception, match=r"model.layers.1.block_sparse_moe.experts.2.w3.weight"):
        load_model(tmp_path / "gap")


# ------------------------------------------------------------------------------------------ experts and routing

def naive_moe(layer, x, ids, weights):
    """sum_j w_j expert_{ids_j}(x) per token, in float64, one token at a time (the reference)."""
    gu, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            g, u = (gu[ids[t, j]] @ x[t].double()).chunk(2)
            out[t] += weights[t, j].double() * (down[ids[t, j]] @ (layer.act(g) * u))
    return out


@pytest.mark.parametrize("inner", [24, 18])  # grouped_mm's 16-byte rows, and one GEMM per expert
@pytest.mark.parametrize("deterministic", [False, True])
def test_experts_grouped_equal_the_per_token_reference(inner, deterministic):
    torch.manual_seed(1)
    layer = moe.SparseMoE(32, inner, 5, 2, activation("silu"), moe_index=0, renormalise=True,
                          weights_in_model_dtype=False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(41, 32)
    ids, w, _, _ = moe.route(x @ layer.router.weight.t(), 2, True)
    mid = torch.empty(1, inner)  # the down projection's input rows
    assert moe._grouped_mm_ok(mid, layer.experts.down_proj, deterministic) == (inner == 24 and not deterministic)
    got = moe.experts_forward(x, ids, w, layer.experts, layer.act, deterministic)
    torch.testing.assert_close(got.double(), naive_moe(layer, x, ids, w), atol=2e-5, rtol=0)
    if deterministic:  # batch invariance: a token's output does not depend on the others
        alone = moe.experts_forward(x[:5], ids[:5], w[:5], layer.experts, layer.act, True)
        assert torch.equal(alone, got[:5])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_replaying_a_record_is_bitwise_the_recorded_forward(family, deterministic, saved):
    _, _, ours = saved(family)
    rec = RoutingRecord.record()
    h = forward(ours, PROMPTS, deterministic, rec)
    t = sum(map(len, PROMPTS))
    k = ours.args.top_k
    assert rec.experts.shape == (len(ours.moe_layers), t, k) and rec.experts.min() >= 0
    assert torch.equal(h, forward(ours, PROMPTS, deterministic))  # recording changes nothing
    rep = RoutingRecord.replay(rec.experts.to(torch.int16))  # stored small, as an engine would
    assert torch.equal(forward(ours, PROMPTS, deterministic, rep), h)
    assert torch.equal(rep.experts, rec.experts) and rep.flip_fraction() == 0.0 and not rep.flipped.any()
    rows = torch.tensor([2, 40, t - 1])  # the last layer computes these rows only: its record has -1 elsewhere
    rec_rows = RoutingRecord.record()
    h_rows = forward(ours, PROMPTS, deterministic, rec_rows, rows)
    last = rec_rows.experts[-1] if ours.moe_layers[-1] == ours.num_layers - 1 else None
    if last is not None:
        assert (last[rows] >= 0).all() and int((last < 0).all(-1).sum()) == t - len(rows)
    assert torch.equal(forward(ours, PROMPTS, deterministic, RoutingRecord.replay(rec_rows.experts), rows), h_rows)


def perturbed_router(lm, scale=0.6):
    """A copy of `lm` with every router's weight perturbed (some tokens' top-k flip)."""
    other = build_model(lm.config)
    other.load_state_dict(lm.state_dict())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in other.moe_layers:
            w = other.layers[i].mlp.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * scale * w.std())
    return other


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_keeps_the_recorded_experts_when_the_router_moves(family, saved):
    _, _, ours = saved(family)
    rec = RoutingRecord.record()
    forward(ours, PROMPTS, routing=rec)
    moved = perturbed_router(ours)
    recomputed = RoutingRecord.record()
    h_new = forward(moved, PROMPTS, routing=recomputed)
    rep = RoutingRecord.replay(rec.experts)
    h_rep = forward(moved, PROMPTS, routing=rep)
    assert torch.equal(rep.experts, rec.experts)  # the recorded experts were used
    assert not torch.equal(recomputed.experts, rec.experts)  # the moved router would route elsewhere ...
    assert rep.flip_fraction() > 0 and not torch.equal(h_rep, h_new)  # ... and the replay reports it
    first = 0  # the first MoE layer sees the same inputs: its flips are exactly where the top-k sets differ
    differ = (recomputed.experts[first].sort(-1).values != rec.experts[first].sort(-1).values).any(-1)
    assert torch.equal(rep.flipped[first], differ)
    assert rep.flip_fraction(any_layer=True) >= rep.flip_fraction()
    partial = rec.experts.clone()
    partial[:, :5] = -1  # rows the record does not cover follow the router
    rep_partial = RoutingRecord.replay(partial)
    forward(moved, PROMPTS, routing=rep_partial)
    assert torch.equal(rep_partial.experts[:, 5:], rec.experts[:, 5:]) and not rep_partial.flipped[:, :5].any()


def test_replayed_gate_weights_are_the_routers_at_the_recorded_experts_with_gradients():
    """Replay: output = sum_j w_j expert_j(x) with w the router's current probabilities at the replayed experts
    (renormalised or not), and the router's gradient is that of this expression (float64 reference)."""
    torch.manual_seed(2)
    x = torch.randn(23, 16)
    chosen = torch.stack([torch.randperm(6)[:3] for _ in range(23)])
    for renorm in (True, False):
        layer = moe.SparseMoE(16, 8, 6, 3, activation("silu"), moe_index=0, renormalise=renorm,
                              weights_in_model_dtype=True)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
        rep = RoutingRecord.replay(chosen[None])
        out = layer(x, False, rep)
        wr = layer.router.weight.detach().double().requires_grad_(True)
        p = torch.softmax(x.double() @ wr.t(), -1).gather(1, chosen)
        w = p / p.sum(-1, keepdim=True) if renorm else p
        ref = naive_moe(layer, x, chosen, w)
        torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=0)
        g = torch.randn(out.shape, dtype=torch.float64)
        (out.double() * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(layer.router.weight.grad.double(), wr.grad, atol=1e-5, rtol=1e-4)
        assert torch.equal(rep.experts[0], chosen)


@pytest.mark.parametrize("family", FAMILIES)
def test_balance_loss_equals_transformers(family, saved):
    """`RoutingRecord.balance_loss()` of the packed forward equals the `aux_loss` transformers' forward computes
    (`load_balancing_loss_func` on its router logits, padding masked out), value and router gradients."""
    hf, _, ours = saved(family)
    seqs = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    ids, att = padded(seqs)
    hf.zero_grad(set_to_none=True)
    ref = hf(input_ids=ids, attention_mask=att, output_router_logits=True, use_cache=False).aux_loss
    ref.backward()
    rec = RoutingRecord.record(balance_loss=True)
    ours.requires_grad_(True).zero_grad(set_to_none=True)
    packed_hidden(ours, pack(PROMPTS, RESPONSES), routing=rec)
    loss = rec.balance_loss()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-6)
    loss.backward()
    for i in ours.moe_layers:
        want = hf.base_model.layers[i].mlp.gate.weight.grad
        torch.testing.assert_close(ours.layers[i].mlp.router.weight.grad, want, atol=1e-7, rtol=1e-4)


def test_routing_passes_through_activation_checkpointing(saved):
    """A checkpointed block recomputed in the backward leaves the record as the forward did, with the same
    gradients as without checkpointing."""
    _, _, ours = saved("qwen3_moe")
    batch = pack(PACK_PROMPTS, RESPONSES)
    rec = RoutingRecord.record()
    packed_hidden(ours, batch, routing=rec)
    twin = build_model(ours.config)
    twin.load_state_dict(ours.state_dict())
    parallelize(twin, checkpointing=True)
    out = {}
    for name, lm in (("plain", ours), ("checkpointed", twin)):
        rep = RoutingRecord.replay(rec.experts, balance_loss=True)
        lm.requires_grad_(True).zero_grad(set_to_none=True)
        h = packed_hidden(lm, batch, routing=rep)
        (h.square().sum() + rep.balance_loss()).backward()
        out[name] = (rep.experts, {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                                   for n, p in lm.named_parameters()})
    assert torch.equal(out["plain"][0], out["checkpointed"][0])
    assert out["plain"][1].keys() == out["checkpointed"][1].keys()
    for n, g in out["plain"][1].items():
        if g is None:  # lm_head: the loss reads the hidden states
            assert out["checkpointed"][1][n] is None
        else:
            assert torch.equal(g, out["checkpointed"][1][n]), n


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_rollout_logprobs_equal_teacher_forced_bitwise(family, saved):
    """The MoE layers are batch-invariant in deterministic mode: a sampled token's log-prob from the engine's decode
    steps equals its teacher-forced one (another batch, another order) bitwise."""
    _, _, ours = saved(family)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, n=2, seed=3)
    outs = RolloutEngine(ours, block_size=4, deterministic=True, max_num_seqs=5).generate(PROMPTS, params)
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    scored = teacher_forced_logprobs(ours, prompts[::-1], outs[::-1], temperature=0.8, deterministic=True,
                                     block_size=4)[::-1]
    assert all(torch.equal(o.logprobs, s) for o, s in zip(outs, scored))


def test_stream_experts_lays_records_out_as_the_packed_stream(saved):
    """Per-sequence records (a rollout's: no row for the last response token) laid out as a shared-prompt packed
    stream replay that stream's own recorded forward bitwise."""
    _, _, ours = saved("qwen3_moe")
    batch = pack(PACK_PROMPTS, RESPONSES, groups=[0, 0, 1, 2], share_prompts=True)
    per_sample = []
    for p, r in zip(PACK_PROMPTS, RESPONSES):
        rec = RoutingRecord.record()
        forward(ours, [p + r[:-1]], routing=rec)
        per_sample.append(rec.experts)
    experts = moe.stream_experts(batch.samples, batch.num_tokens, per_sample)
    assert experts.shape == (2, batch.num_tokens, 2)
    assert int((experts[0] < 0).all(-1).sum()) == len(RESPONSES)  # each last response token: routed by the router
    whole = RoutingRecord.record()
    with torch.no_grad():
        h = packed_hidden(ours, batch, routing=whole)
        rep = RoutingRecord.replay(experts)
        assert torch.equal(packed_hidden(ours, batch, routing=rep), h)
    assert rep.flip_fraction() == 0.0 and torch.equal(rep.experts, whole.experts)


def test_a_dense_model_ignores_routing():
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)).eval()
    lm = from_hf(hf)
    rec = RoutingRecord.record(balance_loss=True)
    assert torch.equal(forward(lm, PROMPTS, routing=rec), forward(lm, PROMPTS))
    assert rec.experts.numel() == 0 and rec.flip_fraction() == 0.0 and float(rec.balance_loss()) == 0.0
