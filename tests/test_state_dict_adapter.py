"""The state-dict adapter: HF names <-> ours, HF checkpoints -> our models (same logits, no second copy), our
exports -> `AutoModelForCausalLM` / `AutoModel` (the same tensors, bitwise, in the same dtype)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_fast.models import state_dict_adapter as sda
from rlhf_fast.models.layers import AttnMetadata, cache_attention
from rlhf_fast.models.loading import ModelLoadError
from rlhf_fast.models.state_dict_adapter import from_hf_name, is_transposed, to_hf_name

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
CASES = {  # name -> (config, causal LM class, backbone class)
    "llama_tied": (lambda: tf.LlamaConfig(**SMALL, tie_word_embeddings=True), tf.LlamaForCausalLM, tf.LlamaModel),
    "llama": (lambda: tf.LlamaConfig(**SMALL, tie_word_embeddings=False), tf.LlamaForCausalLM, tf.LlamaModel),
    "qwen2": (lambda: tf.Qwen2Config(**SMALL, tie_word_embeddings=False), tf.Qwen2ForCausalLM, tf.Qwen2Model),
    "mistral": (lambda: tf.MistralConfig(**SMALL, sliding_window=5, tie_word_embeddings=False),
                tf.MistralForCausalLM, tf.MistralModel),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                   eos_token_id=2, tie_word_embeddings=True), tf.GPT2LMHeadModel, tf.GPT2Model),
}


def hf_model(case: str, *, backbone: bool = False, dtype=torch.float32, seed: int = 0):
    """A tiny randomly initialised transformers model of `case` (biases and norms random too, so a swap shows)."""
    make, causal, bare = CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (bare if backbone else causal)(make())
        with torch.no_grad():
            for p in model.parameters():  # HF's init leaves biases 0 and norms 1: perturb them all
                p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def hf_dir(tmp_path, case: str, *, backbone: bool = False, dtype=torch.float32, **save_kw):
    """(the model, its directory) of `hf_model(case)` saved by transformers."""
    model = hf_model(case, backbone=backbone, dtype=dtype)
    out = tmp_path / f"hf_{case}{'_bare' if backbone else ''}"
    model.save_pretrained(str(out), **save_kw)
    return model, out


def expect_same_tensors(hf, ours, dtype):
    """Every tensor of transformers model `hf` equals ours bitwise, in `dtype` (Conv1D weights transposed), and
    every one of ours is there."""
    our_state = ours.state_dict()
    seen = set()
    for key, t in hf.state_dict().items():
        name = from_hf_name(key, hf.config)
        if name is None:
            continue
        mine = our_state[name].t() if is_transposed(name, hf.config) else our_state[name]
        assert t.dtype == dtype, key
        assert torch.equal(t, mine.to(dtype)), key
        seen.add(name)
    assert seen == set(our_state)


def our_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Our final-normed hidden states (T, hidden) of one sequence `ids` (T,)."""
    t = ids.shape[0]
    attend = cache_attention(AttnMetadata(slot_mapping=None, cu_seqlens=[0, t]), None)
    with torch.no_grad():
        return model(ids, torch.arange(t), attend)


IDS = torch.tensor([1, 5, 9, 17, 3, 60, 22, 8, 8, 41, 0, 33])  # longer than Mistral's window (5)


# ----------------------------------------------------------------------------------------------- names only

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backbone", [False, True])
def test_names_round_trip(case, backbone):
    model = hf_model(case, backbone=backbone)
    ours = set()
    for key in model.state_dict():
        name = from_hf_name(key, model.config)
        assert name is not None, key
        assert to_hf_name(name, model.config, backbone=backbone) == key
        ours.add(name)
    assert any(n.startswith("layers.1.") for n in ours) and "embed.weight" in ours and "norm.weight" in ours
    assert ("lm_head.weight" in ours) == (not backbone)


def test_names_of_each_family():
    llama, gpt2 = CASES["qwen2"][0](), CASES["gpt2"][0]()
    assert from_hf_name("model.layers.3.self_attn.q_proj.bias", llama) == "layers.3.attn.q_proj.bias"
    assert from_hf_name("layers.3.post_attention_layernorm.weight", llama) == "layers.3.mlp_norm.weight"
    assert from_hf_name("model.embed_tokens.weight", llama) == from_hf_name("embed_tokens.weight", llama)
    assert to_hf_name("layers.0.attn_norm.weight", llama) == "model.layers.0.input_layernorm.weight"
    assert to_hf_name("norm.weight", llama, backbone=True) == "norm.weight"
    assert from_hf_name("transformer.wpe.weight", gpt2) == "pos_embed.weight"
    assert to_hf_name("norm.bias", gpt2) == "transformer.ln_f.bias"
    assert to_hf_name("layers.1.mlp.c_fc.weight", gpt2, backbone=True) == "h.1.mlp.c_fc.weight"
    assert is_transposed("layers.1.attn.c_attn.weight", gpt2) and not is_transposed("layers.1.attn.c_attn.bias", gpt2)
    assert not is_transposed("layers.0.attn.q_proj.weight", llama)
    # wrappers' key segments (activation checkpointing, compile) are not part of the name
    assert to_hf_name("layers.0._checkpoint_wrapped_module.attn.o_proj.weight", llama) == \
        "model.layers.0.self_attn.o_proj.weight"


def test_buffers_are_ignored_and_strangers_refused():
    llama, gpt2 = CASES["llama"][0](), CASES["gpt2"][0]()
    assert from_hf_name("transformer.h.0.attn.bias", gpt2) is None
    assert from_hf_name("h.0.attn.masked_bias", gpt2) is None
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq", llama) is None
    assert from_hf_name("model.rotary_emb.inv_freq", llama) is None
    with pytest.raises(KeyError, match="score.weight"):
        from_hf_name("score.weight", llama)
    with pytest.raises(KeyError, match="lm_head"):
        to_hf_name("lm_head.weight", llama, backbone=True)
    with pytest.raises(ModelLoadError, match="bert"):
        from_hf_name("embeddings.word_embeddings.weight", tf.BertConfig())


# ----------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_checkpoint_loads_as_is(tmp_path, case):
    hf, d = hf_dir(tmp_path, case)
    ours = sda.load_pretrained(d)
    assert ours.dtype == torch.float32 and ours.lm_head is not None
    expect_same_tensors(hf, ours, torch.float32)
    assert (ours.lm_head.weight is ours.embed.weight) == hf.config.tie_word_embeddings
    assert all(p.device.type == "cpu" for p in ours.parameters())
    with torch.no_grad():
        want = hf(IDS[None]).logits[0]  # (T, vocab)
    torch.testing.assert_close(ours.logits(our_hidden(ours, IDS), False), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_loads_in_transformers(tmp_path, case, dtype):
    _, d = hf_dir(tmp_path, case)
    ours = sda.load_pretrained(d)
    out = tmp_path / "export"
    sda.save_pretrained(ours, out, dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert cfg["architectures"] == [CASES[case][1].__name__]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not ours.config.tie_word_embeddings)  # tied: stored once
    causal = tf.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(causal) is CASES[case][1] and causal.dtype == dtype
    expect_same_tensors(causal, ours, dtype)
    bare = tf.AutoModel.from_pretrained(str(out), local_files_only=True)
    assert type(bare) is CASES[case][2] and bare.dtype == dtype
    for key, t in bare.state_dict().items():
        assert torch.equal(t, causal.state_dict()[CASES[case][1].base_model_prefix + "." + key]), key


def test_bf16_checkpoint_loads_in_bf16_unless_asked(tmp_path):
    hf, d = hf_dir(tmp_path, "qwen2", dtype=torch.bfloat16)
    ours = sda.load_pretrained(d)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    expect_same_tensors(hf, ours, torch.bfloat16)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["dtype"]  # no dtype in the config: the tensors'
    (d / "config.json").write_text(json.dumps(cfg))
    assert {p.dtype for p in sda.load_pretrained(d).parameters()} == {torch.bfloat16}
    wide = sda.load_pretrained(d, dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    expect_same_tensors(hf.float(), wide, torch.float32)


@pytest.mark.parametrize("case", ["gpt2", "llama_tied"])
def test_sharded_export_round_trips(tmp_path, case):
    hf, d = hf_dir(tmp_path, case)
    ours = sda.load_pretrained(d)
    out = tmp_path / "export"
    sda.save_pretrained(ours, out, max_shard_bytes=20_000)
    index = json.loads((out / sda.INDEX).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / sda.SINGLE).exists()
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = [sum(t.numel() * t.element_size() for t in load_file(str(out / s)).values()) for s in shards]
    assert index["metadata"]["total_size"] == sum(sizes)
    assert all(n <= 20_000 for n in sizes if n > 0)
    expect_same_tensors(tf.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True), ours,
                        torch.float32)
    expect_same_tensors(hf, sda.load_pretrained(out), torch.float32)


@pytest.mark.parametrize("case", ["gpt2", "qwen2"])
def test_sharded_hf_checkpoint_loads(tmp_path, case):
    hf, d = hf_dir(tmp_path, case, max_shard_size="30KB")
    assert (d / sda.INDEX).is_file()
    expect_same_tensors(hf, sda.load_pretrained(d), torch.float32)


def test_load_makes_no_second_copy(tmp_path, monkeypatch):
    """The parameters are the tensors safetensors returned (no clone, no copy into preallocated ones); only GPT-2's
    transposed Conv1D weights and cast tensors are new."""
    returned = {}
    real = sda.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            returned[key] = t  # kept alive, so a copy cannot reuse its address
            return t

    monkeypatch.setattr(sda, "safe_open", Recording)
    for case in ("llama_tied", "gpt2"):
        hf, d = hf_dir(tmp_path, case)
        returned.clear()
        ours = sda.load_pretrained(d)
        for name, p in ours.named_parameters():
            key = to_hf_name(name, ours.config)
            if is_transposed(name, ours.config):
                assert p.is_contiguous() and torch.equal(p, returned[key].t()), name
            else:
                assert p.data_ptr() == returned[key].data_ptr(), name


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    _, d = hf_dir(tmp_path, "qwen2")
    state = load_file(str(d / "model.safetensors"))
    gone = state.pop("model.layers.1.self_attn.k_proj.bias")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        sda.load_pretrained(d)
    state["model.layers.1.self_attn.k_proj.bias"] = gone
    state["score.weight"] = torch.zeros(1, 32)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="unexpected tensor 'score.weight'"):
        sda.load_pretrained(d)


def test_unloadable_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        sda.load_pretrained(tmp_path / "nowhere")
    CASES["llama"][0]().save_pretrained(str(tmp_path / "bin"))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pytorch_model.*safetensors"):
        sda.load_pretrained(tmp_path / "bin")
    CASES["llama"][0]().save_pretrained(str(tmp_path / "torn"))
    (tmp_path / "torn" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="cannot read .*model.safetensors"):
        sda.load_pretrained(tmp_path / "torn")
    tf.BertConfig().save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ModelLoadError, match="bert"):
        sda.load_pretrained(tmp_path / "bert")


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_backbone_round_trip(tmp_path, case):
    hf, d = hf_dir(tmp_path, case, backbone=True)
    ours = sda.load_pretrained(d, backbone=True)
    assert ours.lm_head is None
    expect_same_tensors(hf, ours, torch.float32)
    with torch.no_grad():
        want = hf(IDS[None]).last_hidden_state[0]  # (T, hidden)
    torch.testing.assert_close(our_hidden(ours, IDS), want, rtol=1e-5, atol=1e-5)
    out = tmp_path / "export"
    sda.save_pretrained(ours, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == [CASES[case][2].__name__]
    assert not (out / "generation_config.json").exists()
    back = tf.AutoModel.from_pretrained(str(out), local_files_only=True)
    assert type(back) is CASES[case][2]
    expect_same_tensors(back, ours, torch.float32)


def test_causal_lm_and_backbone_checkpoints_cross(tmp_path):
    hf, d = hf_dir(tmp_path, "llama")
    bare = sda.load_pretrained(d, backbone=True)  # a causal LM's checkpoint as a backbone: its head dropped
    assert bare.lm_head is None and "lm_head.weight" not in bare.state_dict()
    expect_same_tensors(hf.model, bare, torch.float32)
    _, tied = hf_dir(tmp_path, "gpt2", backbone=True)  # a tied backbone as a causal LM: lm_head is the embedding
    lm = sda.load_pretrained(tied)
    assert lm.lm_head.weight is lm.embed.weight
    _, untied = hf_dir(tmp_path, "qwen2", backbone=True)
    with pytest.raises(ModelLoadError, match="no lm_head.weight.*backbone=True"):
        sda.load_pretrained(untied)


def test_export_writes_generation_config_tokenizer_and_replaces_the_directory(tmp_path):
    from rlhf_fast.default_task import build_tokenizer

    _, d = hf_dir(tmp_path, "llama_tied")
    ours = sda.load_pretrained(d)
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    sda.save_pretrained(ours, out, tokenizer=build_tokenizer(tmp_path / "tok"))
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind
    gen = tf.GenerationConfig.from_pretrained(str(out), local_files_only=True)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    assert tf.AutoTokenizer.from_pretrained(str(out), local_files_only=True) is not None


@pytest.mark.parametrize("case", ["gpt2", "qwen2"])
def test_converted_hf_model_exports(tmp_path, case):
    """A DecoderLM `from_hf` converted shares HF's modules (GPT-2's Conv1D, already (in, out)): exported as is."""
    from rlhf_fast.models import from_hf

    hf = hf_model(case)
    sda.save_pretrained(from_hf(hf), tmp_path / "export")
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    for key, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key


def test_export_of_a_given_state_dict(tmp_path):
    _, d = hf_dir(tmp_path, "gpt2")
    ours = sda.load_pretrained(d)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["layers.1.mlp.c_fc.weight"] += 1.0  # e.g. merged LoRA weights
    sda.save_pretrained(ours, tmp_path / "export", state_dict=state)
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    assert torch.equal(back.transformer.h[1].mlp.c_fc.weight, state["layers.1.mlp.c_fc.weight"].t())
    assert torch.equal(back.transformer.h[0].mlp.c_fc.weight, ours.layers[0].mlp.c_fc.weight.t())
    state["layers.0.attn.c_attn.lora_A.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="lora_A.*merged_state_dict"):
        sda.save_pretrained(ours, tmp_path / "export2", state_dict=state)
    assert not (tmp_path / "export2").exists()


def test_fsdp2_sharded_model_exports(tmp_path):
    """Two ranks shard the model with FSDP2; the export (gathered on rank 0) loads in transformers with the source's
    tensors, bitwise, and written once (no rank's temp directory left)."""
    args, sources = [], {}
    for case in ("llama_tied", "gpt2"):
        sources[case], d = hf_dir(tmp_path, case)
        args += [str(d), str(tmp_path / f"export_{case}")]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests._sda_fsdp_worker", *args]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    for case, hf in sources.items():
        out = tmp_path / f"export_{case}"
        assert (out / sda.INDEX).is_file()
        back = tf.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
        for key, t in hf.state_dict().items():
            assert torch.equal(back.state_dict()[key], t), key
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
