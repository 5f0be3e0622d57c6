"""LoRA in rlhf_fast's own modules (`rlhf_fast.models.lora`) against peft on the same tiny HF models: the
forward, peft's adapter format both ways, disabled adapters, gradients, the merged weights, and what is refused."""
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM, LlamaModel,
                          Qwen2Config, Qwen2ForCausalLM)

from rlhf_fast.config import ConfigError, LoRAConfig
from rlhf_fast.models import build_model
from rlhf_fast.models import lora as lo
from rlhf_fast.models.loading import ModelLoadError
from rlhf_fast.models.state_dict_adapter import from_hf_name, is_transposed, to_hf_name

T = 13  # tokens of the test sequence
_LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
_GPT2 = dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
MAKERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA, bos_token_id=0, eos_token_id=0)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**_GPT2)),
    "llama-backbone": lambda: LlamaModel(LlamaConfig(**_LLAMA, bos_token_id=0, eos_token_id=0)),
    "gpt2-backbone": lambda: GPT2Model(GPT2Config(**_GPT2)),
}
SOME = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["k_proj", "o_proj", "up_proj"], "gpt2": ["c_attn"],
        "llama-backbone": ["q_proj", "gate_proj"], "gpt2-backbone": ["c_proj"]}


def _hf(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return MAKERS[family]().eval()


def _ours(hf):
    """Our model of `hf`'s architecture holding a copy of its weights (not sharing them: LoRA swaps our modules)."""
    backbone = not hasattr(hf, "lm_head")
    model = build_model(hf.config, lm_head=not backbone, device="cpu")
    sd = {}
    for k, v in hf.state_dict().items():
        ours = from_hf_name(k, hf.config)
        if ours is not None:
            sd[ours] = (v.t() if is_transposed(ours, hf.config) else v).clone()
    model.load_state_dict(sd, strict=False)
    missing = set(model.state_dict()) - set(sd)
    assert not {k for k in missing if "lm_head" not in k}, missing  # a tied lm_head comes with the embedding
    return model.eval()


def _attend(layer, q, k, v, scale, window=0, softcap=0.0, sinks=None):
    """Causal attention over one sequence: q (T, H, D), k / v (T, Hkv, D) -> (T, H, D)."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = (x.transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))  # (H, T, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (T,), generator=torch.Generator().manual_seed(seed))


def _run_ours(model, ids):
    """Logits (T, vocab), or the final hidden states (T, hidden) of a backbone."""
    h = model(ids, torch.arange(len(ids)), _attend)
    return h if model.lm_head is None else model.logits(h, False)


def _run_hf(hf, ids):
    out = hf(input_ids=ids[None])
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].float()


def _peft_module(pm, hf_name: str):
    return pm.get_base_model().get_submodule(hf_name)


def _randomize_b(model, seed: int = 3):
    """Random lora_B (it starts at zero), so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lo.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def _peft_twin(hf, ours, targets):
    """peft on `hf` with `ours`' adapter weights copied in module by module."""
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, m in lo.lora_modules(ours).items():
            pl = _peft_module(pm, to_hf_name(f"{n}.weight", hf.config,
                                             backbone=ours.lm_head is None).removesuffix(".weight"))
            pl.lora_A["default"].weight.copy_(m.lora_A.weight)
            pl.lora_B["default"].weight.copy_(m.lora_B.weight)
    return pm.eval()


@pytest.mark.parametrize("family", list(MAKERS))
@pytest.mark.parametrize("targets", ["all-linear", "some"])
def test_forward_equals_peft_and_disabled_equals_base(family, targets, tmp_path):
    hf = _hf(family)
    ours = _ours(hf)
    ids = _ids()
    base = _run_hf(hf, ids)
    torch.testing.assert_close(_run_ours(ours, ids), base, rtol=1e-5, atol=1e-5)
    tm = "all-linear" if targets == "all-linear" else ",".join(SOME[family])
    names = lo.apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=tm), seed=0)
    assert names == list(lo.lora_modules(ours))
    torch.testing.assert_close(_run_ours(ours, ids), base, rtol=1e-5, atol=1e-5)  # B = 0: the base
    _randomize_b(ours)
    pm = _peft_twin(hf, ours, "all-linear" if targets == "all-linear" else SOME[family])
    got = _run_ours(ours, ids)
    torch.testing.assert_close(got, _run_hf(pm, ids), rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    with lo.adapters_disabled(ours):
        torch.testing.assert_close(_run_ours(ours, ids), base, rtol=1e-5, atol=1e-5)
    assert not any(m.disabled for m in lo.lora_modules(ours).values())

    # our export has peft's own key names and loads into peft with the same outputs
    lo.save_adapter(ours, tmp_path / "ours", base_dir="some/base")
    pm.save_pretrained(str(tmp_path / "peft"))
    assert load_file(str(tmp_path / "ours" / lo.WEIGHTS_FILE)).keys() == \
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    cfg = json.loads((tmp_path / "ours" / lo.CONFIG_FILE).read_text())
    assert cfg["base_model_name_or_path"] == "some/base" and (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["task_type"] == (None if "backbone" in family else "CAUSAL_LM")
    assert cfg["fan_in_fan_out"] == family.startswith("gpt2")
    if targets == "some":
        assert sorted(cfg["target_modules"]) == sorted(SOME[family])
    loaded = PeftModel.from_pretrained(_hf(family), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_run_hf(loaded, ids), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-backbone"])
@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_made_adapter_loads_into_ours(family, rslora, tmp_path):
    hf = _hf(family)
    targets = SOME[family]
    pm = get_peft_model(_hf(family), LoraConfig(r=3, lora_alpha=5, lora_dropout=0.1, use_rslora=rslora,
                                                 target_modules=targets))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ours = _ours(hf)
    names = lo.load_adapter(ours, tmp_path / "adapter")
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(targets)
    assert all(isinstance(m.dropout, torch.nn.Dropout) and m.dropout.p == 0.1 for m in lo.lora_modules(ours).values())
    ids = _ids(2)
    torch.testing.assert_close(_run_ours(ours, ids), _run_hf(pm.eval(), ids), rtol=1e-5, atol=1e-5)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{x}.weight" for n in names for x in "AB"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_merged_state_dict_equals_peft_merge_and_unload(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.state_dict_adapter import save_pretrained

    hf = _hf(family)
    ours = _ours(hf)
    keys = set(ours.state_dict())
    lo.apply_lora(ours, LoRAConfig(r=4, alpha=8), seed=5)
    assert {k for k in ours.state_dict() if ".lora_" not in k} == keys  # the base's keys do not change
    _randomize_b(ours)
    merged_hf = _peft_twin(hf, ours, "all-linear").merge_and_unload()
    merged = lo.merged_state_dict(ours)
    assert set(merged) == keys
    for k, v in merged_hf.state_dict().items():
        name = from_hf_name(k, hf.config)
        if name is not None:
            torch.testing.assert_close(merged[name], v.t() if is_transposed(name, hf.config) else v,
                                       rtol=1e-6, atol=1e-6)
    half = lo.merged_state_dict(ours, torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    if ours.lm_head is not None and ours.lm_head.weight is ours.embed.weight:
        assert half["lm_head.weight"] is half["embed.weight"]  # tied weights stay one tensor
    save_pretrained(ours, tmp_path / "merged", state_dict=merged)  # the plain export: transformers loads it
    ids = _ids()
    torch.testing.assert_close(_run_hf(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), ids),
                               _run_ours(ours, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_the_adapters_get_gradients(family):
    ours = _ours(_hf(family))
    before = dict(ours.named_parameters())
    names = lo.apply_lora(ours, LoRAConfig(r=2, alpha=4), seed=0)
    for n in names:  # the base Parameters are the same objects
        assert ours.get_submodule(n).weight is before[f"{n}.weight"]
    _randomize_b(ours)
    _run_ours(ours.train(), _ids()).logsumexp(-1).sum().backward()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in lo.adapter_parameters(ours)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)
    assert set(lo.adapter_state_dict(ours)) == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}


def test_seeded_init_a_kaiming_b_zero():
    a = _ours(_hf("llama"))
    b = _ours(_hf("llama"))
    c = _ours(_hf("llama"))
    for m, s in ((a, 7), (b, 7), (c, 8)):
        lo.apply_lora(m, LoRAConfig(r=4, alpha=8, target_modules="q_proj"), seed=s)
    la, lb, lc = (lo.lora_modules(m)["layers.0.attn.q_proj"] for m in (a, b, c))
    assert torch.equal(la.lora_A.weight, lb.lora_A.weight) and not torch.equal(la.lora_A.weight, lc.lora_A.weight)
    assert la.lora_A.weight.abs().max() <= 32 ** -0.5 and not la.lora_B.weight.any()  # bound 1/sqrt(in)
    assert la.scaling == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_forward_against_float64(dtype):
    base = torch.nn.Linear(41, 23, dtype=dtype)
    m = lo.LoRALinear(base, 5, 7.0, generator=torch.Generator().manual_seed(0))
    assert m.weight is base.weight and m.bias is base.bias and not m.weight.requires_grad
    assert m.lora_A.weight.dtype == torch.float32  # as peft: fp32 adapters on a half-precision base
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(3, 17, 41, dtype=dtype)
    y = m(x)
    assert y.shape == (3, 17, 23) and y.dtype == dtype
    xd = x.double()
    ref = xd @ m.weight.double().t() + m.bias.double() + 1.4 * (xd @ m.lora_A.weight.double().t()) @ \
        m.lora_B.weight.double().t()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(m(x[0], deterministic=True), y[0], **tol)
    m.disabled = True
    torch.testing.assert_close(m(x), base(x))


def test_refusals(tmp_path):
    ours = _ours(_hf("llama"))
    with pytest.raises(ConfigError, match="c_attn matches no projection.*down_proj, gate_proj, k_proj, o_proj"):
        lo.apply_lora(ours, LoRAConfig(r=2, target_modules="q_proj,c_attn"))
    with pytest.raises(ConfigError, match="lm_head matches no projection"):
        lo.apply_lora(ours, LoRAConfig(r=2, target_modules="lm_head"))
    assert not lo.lora_modules(ours)
    lo.apply_lora(ours, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has adapters"):
        lo.apply_lora(ours, LoRAConfig(r=2))

    def peft_dir(name, **kw):
        pm = get_peft_model(_hf("llama"), LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **kw}))
        pm.save_pretrained(str(tmp_path / name))
        return tmp_path / name

    for name, kw, what in [("dora", dict(use_dora=True), "use_dora=True"),
                           ("save", dict(modules_to_save=["lm_head"]), "modules_to_save"),
                           ("bias", dict(bias="all"), "bias='all'"),
                           ("rank", dict(rank_pattern={"q_proj": 4}), "rank_pattern")]:
        with pytest.raises(ModelLoadError, match=what):
            lo.load_adapter(_ours(_hf("llama")), peft_dir(name, **kw))
    with pytest.raises(ModelLoadError, match="embed_tokens"):
        lo.load_adapter(_ours(_hf("llama")), peft_dir("embed", target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ModelLoadError, match="not a peft adapter directory"):
        lo.load_adapter(_ours(_hf("llama")), tmp_path)


def test_an_adapter_on_some_layers_round_trips_through_peft(tmp_path):
    """peft's `layers_to_transform`: only layer 1's q_proj; our export names exactly that module for peft."""
    pm = get_peft_model(_hf("llama"), LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], layers_to_transform=[1]))
    with torch.no_grad():
        pm.get_base_model().model.layers[1].self_attn.q_proj.lora_B["default"].weight.normal_()
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = _ours(_hf("llama"))
    assert lo.load_adapter(ours, tmp_path / "peft") == ["layers.1.attn.q_proj"]
    lo.save_adapter(ours, tmp_path / "ours", base_dir=None)
    assert json.loads((tmp_path / "ours" / lo.CONFIG_FILE).read_text())["target_modules"] == \
        ["model.layers.1.self_attn.q_proj"]
    back = PeftModel.from_pretrained(_hf("llama"), str(tmp_path / "ours")).eval()
    ids = _ids(3)
    torch.testing.assert_close(_run_hf(back, ids), _run_hf(pm.eval(), ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run_ours(ours, ids), _run_hf(pm, ids), rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_adapters_equals_peft():
    hf = _hf("qwen2").to(torch.bfloat16)
    ours = _ours(hf)
    lo.apply_lora(ours, LoRAConfig(r=4, alpha=8), seed=0)
    assert {m.lora_A.weight.dtype for m in lo.lora_modules(ours).values()} == {torch.float32}
    _randomize_b(ours)
    ids = _ids()
    base = _run_hf(hf, ids)
    pm = _peft_twin(hf, ours, "all-linear")
    assert _peft_module(pm, "model.layers.0.mlp.up_proj").lora_A["default"].weight.dtype == torch.float32
    got, want = _run_ours(ours, ids), _run_hf(pm, ids)
    assert (got - want).abs().max() <= 0.03 * want.abs().max() < (want - base).abs().max()  # bf16 rounding only


def test_checkpoint_wrapped_blocks_keep_names_and_gradients(tmp_path):
    from rlhf_fast.parallelize import parallelize

    def grads(model):
        torch.manual_seed(9)  # LoRA dropout: the recompute must draw the same masks
        _run_ours(model.train(), _ids()).logsumexp(-1).sum().backward()
        return [p.grad for p in lo.adapter_parameters(model)]

    plain, wrapped = _ours(_hf("llama")), _ours(_hf("llama"))
    for m in (plain, wrapped):
        lo.apply_lora(m, LoRAConfig(r=2, alpha=4, dropout=0.2), seed=1)
        _randomize_b(m)
    keys = set(plain.state_dict())
    parallelize(wrapped, checkpointing=True)
    assert set(wrapped.state_dict()) == keys and set(lo.merged_state_dict(wrapped)) == set(lo.merged_state_dict(plain))
    for g, r in zip(grads(wrapped), grads(plain)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    lo.save_adapter(wrapped, tmp_path / "w", base_dir=None)
    lo.save_adapter(plain, tmp_path / "p", base_dir=None)
    a, b = (load_file(str(tmp_path / d / lo.WEIGHTS_FILE)) for d in ("w", "p"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = _ours(_hf("llama"))
    parallelize(reloaded, checkpointing=True)
    assert len(lo.load_adapter(reloaded, tmp_path / "w")) == 14


def test_lora_linear_is_what_project_computes():
    from rlhf_fast.models.layers import project

    m = lo.LoRALinear(torch.nn.Linear(37, 19), 3, 5.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(41, 37)
    for det in (False, True):
        assert torch.equal(m(x, det), project(x, m, det))


def test_two_sharded_ranks_match_one_process(tmp_path):
    """FSDP2 (`parallelize`, 2 ranks, gloo) over adapted blocks (frozen base and trainable adapters in one group):
    the one-process loss and adapter gradients, the same merged weights and the same exported adapter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests import _lora_owned_worker as worker

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests._lora_owned_worker", str(tmp_path)]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    one = worker.run(tmp_path)
    two = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, ref in one.items():
        assert two[0][name]["sharded"] and not ref["sharded"]
        assert two[0][name]["loss"] == pytest.approx(ref["loss"], rel=1e-6) and two[1][name]["merged"] == {}
        for got in (two[0][name]["grads"], two[1][name]["grads"]):
            for g, r in zip(got, ref["grads"], strict=True):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
        merged = two[0][name]["merged"]
        assert merged.keys() == ref["merged"].keys()
        for k, v in ref["merged"].items():
            torch.testing.assert_close(merged[k], v, rtol=0, atol=0)
        a, b = (load_file(str(tmp_path / f"{name}-w{w}" / lo.WEIGHTS_FILE)) for w in (1, 2))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
