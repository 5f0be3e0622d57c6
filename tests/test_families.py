"""The dense families beyond Llama: Qwen3, Gemma 2, Gemma 3 text, Phi-3 and OLMo 2, as rlhf_fast's own models,
against transformers' forward and generate (tiny random configs, fp32, CPU): logits, greedy tokens past the sliding
windows, sampled log-probs, the packed training forward and its gradients, the HF checkpoint round trip (Phi-3's
fused tensors split on load and fused back on export), `from_hf`, Gemma's soft-capped logits in training (the fused
ops' `softcap`) and the refusals (run-time rope scaling)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from rlhf_fast.models import UnsupportedModelError, build_model, covered_families, from_hf, load_model, loading
from rlhf_fast.models.layers import cache_attention
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.models.state_dict_adapter import from_hf_names, load_pretrained, save_pretrained
from rlhf_fast.rollout import RolloutEngine, SamplingParams, block_table, teacher_forced_logprobs

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
# no EOS: HF generate suppresses it under min_new_tokens, the engine (no stop tokens) does not
CONFIGS = {  # windows of 6-7 tokens: the prompts and generations below run far past them
    "qwen3": lambda: tf.Qwen3Config(head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                    **SMALL),
    "gemma2": lambda: tf.Gemma2Config(head_dim=8, sliding_window=6, query_pre_attn_scalar=12,
                                      attn_logit_softcapping=1.5, final_logit_softcapping=2.0, **SMALL),
    "gemma3": lambda: tf.Gemma3TextConfig(head_dim=8, sliding_window=6, sliding_window_pattern=2,
                                          query_pre_attn_scalar=12, final_logit_softcapping=2.0,
                                          rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear",
                                                                                   "factor": 2.0}, **SMALL),
    "phi3": lambda: tf.Phi3Config(sliding_window=7, partial_rotary_factor=0.5, tie_word_embeddings=False, **SMALL),
    "olmo2": lambda: tf.Olmo2Config(**SMALL),
}
FAMILIES = list(CONFIGS)
PROMPTS = [[1, 5, 7], list(range(9, 39)), [3] * 20, [60, 2, 44, 9, 61, 62, 63, 5, 6, 70, 71]]  # 3, 30, 20, 11


def hf_model(family: str, dtype=torch.float32):
    """A tiny random transformers model of `family`, every parameter perturbed (HF starts norms at 1 or 0)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
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
            cache[family] = (hf, path, load_pretrained(path))
        return cache[family]
    return get


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def our_logits(lm, seqs: list[list[int]], deterministic: bool = False) -> torch.Tensor:
    """Logits (sum of lengths, V) of `seqs` packed in one prefill."""
    inputs = block_table.prefill_inputs(seqs, None, 4, torch.device("cpu"), deterministic=False, logits="all")
    with torch.no_grad():
        h = lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, None), deterministic)
        return lm.logits(h, deterministic)


def test_covered_families_list_the_dense_families():
    assert {"Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
            "Olmo2ForCausalLM", "LlamaForCausalLM"} <= set(covered_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf_forward(family, saved):
    hf, _, ours = saved(family)
    ref = torch.cat([hf_logits(hf, s) for s in PROMPTS]).double()
    assert ours.windows == [hf.config.sliding_window if t == "sliding_attention" else 0
                            for t in hf.config.layer_types] if hasattr(hf.config, "layer_types") else True
    for lm in (ours, from_hf(hf)):
        for det in (False, True):
            torch.testing.assert_close(our_logits(lm, PROMPTS, det).double(), ref, atol=1e-5, rtol=0)


def assert_greedy_matches(hf, outs, n):
    for o in outs:
        prompt = PROMPTS[o.prompt_index]
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):]
        ref = ref.tolist()
        if o.token_ids != ref:  # allowed only where HF's two best logits tie within 1e-6
            i = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
            top2 = hf_logits(hf, prompt + ref[:i])[-1].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-6, (o.prompt_index, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_hf_generate_past_the_window(family, saved):
    hf, _, ours = saved(family)
    n = 24
    outs = RolloutEngine(ours, block_size=4).generate(PROMPTS, SamplingParams(max_new_tokens=n, temperature=0))
    assert all(len(o.token_ids) == n for o in outs)
    assert_greedy_matches(hf, outs, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_match_hf_forward(family, saved):
    hf, _, ours = saved(family)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, n=2, seed=5)
    outs = RolloutEngine(ours, block_size=4, max_num_seqs=5).generate(PROMPTS, params)
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    scored = teacher_forced_logprobs(ours, prompts[::-1], outs[::-1], temperature=0.8, block_size=4)[::-1]
    converted = teacher_forced_logprobs(hf, prompts, outs, temperature=0.8, block_size=4)  # via from_hf
    for p, o, s, c in zip(prompts, outs, scored, converted):
        logits = hf_logits(hf, p + o.token_ids[:-1])[len(p) - 1:]
        ref = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        for got in (o.logprobs, s, c):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_rollout_and_scoring_are_bitwise_equal(family, saved):
    """Batch-invariant mode: the scorer, in another composition and order, gives the engine's log-probs bitwise
    (soft-capped paged attention, partial rotary, post-norms included): the PPO ratio at unchanged weights is 1."""
    _, _, ours = saved(family)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, n=2, seed=5)
    outs = RolloutEngine(ours, block_size=4, max_num_seqs=5, deterministic=True).generate(PROMPTS, params)
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    scored = teacher_forced_logprobs(ours, prompts[::-1], outs[::-1], temperature=0.8, deterministic=True,
                                     block_size=4)[::-1]
    assert all(torch.equal(o.logprobs, s) for o, s in zip(outs, scored))


def hf_hidden(hf, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Right-padded HF backbone forward: (len, hidden) final hidden states of each sequence."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = torch.tensor(s), 1
    out = hf.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_training_forward_and_gradients_match_hf(family, saved):
    """The padding-free forward (shared prompts, windows crossed) and its gradients on our own model's parameters
    against HF's padded forward; Phi-3's q/k/v (gate/up) gradients are the rows of HF's fused ones."""
    hf, _, ours = saved(family)
    hf, ours = hf.train(False), ours.requires_grad_(True)
    prompts = [PROMPTS[1]] * 2 + [PROMPTS[2], PROMPTS[3]]
    responses = [[11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33, 34, 35, 36, 37, 38], [40, 41]]
    seqs = [p + r for p, r in zip(prompts, responses)]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(len(s), hf.config.hidden_size, generator=gen) for s in seqs]
    ref = hf_hidden(hf, seqs)
    g_ref = grads(hf, sum((h * w).sum() for h, w in zip(ref, weights)))
    batch = pack(prompts, responses, groups=[0, 0, 1, 2], share_prompts=True)
    h = packed_hidden(ours, batch)  # (T, hidden); the shared prompt's rows once
    assert h.shape[0] == batch.num_tokens == sum(map(len, seqs)) - len(prompts[1])
    w_packed = torch.zeros_like(h)
    for i, (ps, pe, rs, re_) in enumerate(batch.samples):
        torch.testing.assert_close(torch.cat((h[ps:pe], h[rs:re_])), ref[i].detach(), atol=1e-5, rtol=1e-5)
        w_packed[rs:re_] += weights[i][pe - ps:]
        w_packed[ps:pe] += weights[i][:pe - ps]  # a shared prompt's rows carry every sample's weight
    g = grads(ours, (h * w_packed).sum())
    for name, want in g_ref.items():
        parts = from_hf_names(name, hf.config)
        got = torch.cat([g[k] for k in parts])
        scale = float(want.abs().max())  # fp32 rounding relative to the tensor's scale (sums of many rows' terms)
        torch.testing.assert_close(got, want, atol=1e-6 * scale + 1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert set(g) == {k for name in g_ref for k in from_hf_names(name, hf.config)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_is_bitwise(family, dtype, tmp_path):
    """HF checkpoint -> ours -> our export -> `AutoModelForCausalLM`: the same tensors, bitwise, under the same
    names (Phi-3's fused `qkv_proj` / `gate_up_proj` split on load, concatenated back on export)."""
    hf = hf_model(family, dtype)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(tmp_path / "hf")
    assert ours.dtype == dtype
    if family == "phi3":
        assert "qkv_proj" not in dict(ours.layers[0].attn.named_children())
        q, k = ours.layers[0].attn.q_proj.weight, ours.layers[0].attn.k_proj.weight
        assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()  # parts own their storage
    save_pretrained(ours, tmp_path / "ours", max_shard_bytes=20_000)  # sharded: a fused tensor is written whole
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=dtype)
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == dtype and torch.equal(a[key], b[key]), key
    written = set()
    for f in (tmp_path / "ours").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            written |= set(st.keys())
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as st:
        assert written == set(st.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_shares_every_parameter(family, tmp_path):
    """The drop-in API's conversion shares HF's modules (Phi-3: its fused projections themselves), nothing copied;
    a step on the HF model is what ours computes with; its export is the HF model's tensors."""
    hf = hf_model(family)
    lm = from_hf(hf)
    assert {p.data_ptr() for p in lm.parameters()} == {p.data_ptr() for p in hf.parameters()}
    before = our_logits(lm, PROMPTS[:2])
    with torch.no_grad():
        for p in hf.base_model.layers[0].mlp.parameters():
            p.mul_(1.5)
    after = our_logits(lm, PROMPTS[:2])
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.double(), torch.cat([hf_logits(hf, s) for s in PROMPTS[:2]]).double(),
                               atol=1e-5, rtol=0)
    if family == "phi3":
        attn = lm.layers[0].attn
        assert attn.qkv_proj is hf.base_model.layers[0].self_attn.qkv_proj and not hasattr(attn, "q_proj")
    save_pretrained(lm, tmp_path / "converted")
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "converted")).state_dict()
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(t, back[k]) for k, t in hf.state_dict().items())


def test_phi3_run_time_rope_is_refused_in_one_line():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 64}
    cfg = tf.Phi3Config(**SMALL, rope_parameters=rope)
    with pytest.raises(UnsupportedModelError, match=r"^Phi3Config: rope_type 'longrope' rescales .* not supported$"):
        build_model(cfg, device="meta")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_soft_capped_model_trains_on_the_capped_log_probs(family, saved):
    """SFT's loss on a soft-capped model (the fused op with `softcap`) is transformers' own: its logits are capped
    (c tanh(z / c)) before the log-softmax; the gradient of every parameter equals the HF forward's."""
    from rlhf_fast.data import SFTExample
    from rlhf_fast.stages.sft import response_nll

    hf, path, _ = saved(family)
    model = load_model(path, "sft.model")
    assert model.final_logit_softcap == 2.0
    ids = [1, 5, 9, 33, 2, 71, 8, 8, 40, 12, 3]
    nll, n = response_nll(model, [SFTExample(ids, 3)])
    nll.backward()
    hf.zero_grad(set_to_none=True)
    logits = hf(torch.tensor([ids])).logits[0].float()  # (T, V), capped by transformers
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ref = -logp[2:].sum()  # tokens 3.. are trained
    ref.backward()
    assert n == len(ids) - 3
    torch.testing.assert_close(nll.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    theirs = dict(hf.named_parameters())
    from rlhf_fast.models import state_dict_adapter as sda

    for name, p in model.named_parameters():
        g = theirs[sda.to_hf_name(name, model)].grad
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=name)


def test_families_load_for_training(saved):
    for family in ("qwen3", "phi3", "olmo2", "gemma2", "gemma3"):
        _, path, _ = saved(family)
        assert load_model(path, "sft.model").lm_head is not None


@pytest.mark.parametrize("family,targets", [("phi3", "all-linear"), ("phi3", "q_proj,up_proj"),
                                            ("gemma2", "all-linear"), ("olmo2", "q_proj,down_proj")])
def test_lora_exports_in_peft_format(family, targets, saved, tmp_path):
    """Our adapters load into peft on the transformers model with the same logits; on Phi-3 the adapters of q/k/v
    (gate/up) become one LoRA on HF's fused module (rank k r, B block-diagonal; rank_pattern when k > 1)."""
    import json

    from peft import PeftModel

    from rlhf_fast.config import LoRAConfig
    from rlhf_fast.models import lora

    _, path, _ = saved(family)
    ours = load_pretrained(path)
    lora.apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets), seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora.lora_modules(ours).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)
    got = our_logits(ours, PROMPTS[:2])
    lora.save_adapter(ours, tmp_path / "adapter", base_dir=path)
    cfg = json.loads((tmp_path / "adapter" / lora.CONFIG_FILE).read_text())
    if family == "phi3":
        assert "qkv_proj" in cfg["target_modules"] and "q_proj" not in cfg["target_modules"]
        assert bool(cfg["rank_pattern"]) == (targets == "all-linear")
    peft = PeftModel.from_pretrained(hf_model(family), str(tmp_path / "adapter")).eval()
    ref = torch.cat([hf_logits(peft, s) for s in PROMPTS[:2]])
    assert (got - our_logits(load_pretrained(path), PROMPTS[:2])).abs().max() > 1e-2  # the adapters count
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=0)


def test_a_peft_adapter_on_phi3_fused_modules_loads_into_ours(saved, tmp_path):
    """A user's peft LoRA on HF Phi-3's `qkv_proj` / `gate_up_proj` (B A on the fused rows) goes to our parts: each
    the same A and its rows of B, exactly."""
    from peft import LoraConfig, get_peft_model

    from rlhf_fast.models import lora

    hf, path, _ = saved("phi3")
    pm = get_peft_model(hf_model("phi3"), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = load_pretrained(path)
    names = lora.load_adapter(ours, tmp_path / "peft")
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    ref = torch.cat([hf_logits(pm.eval(), s) for s in PROMPTS[:2]])
    torch.testing.assert_close(our_logits(ours, PROMPTS[:2]).double(), ref.double(), atol=1e-5, rtol=0)
