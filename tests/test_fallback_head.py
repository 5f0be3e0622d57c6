"""The fallback path (an HF backbone's final hidden states + the fused log-prob from hidden states, for architectures
without a compact model) against transformers' own logits, for every architecture it accepts; the ones whose logits
are not `lm_head(final hidden)` (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling) are refused
with one line instead of silently trained on wrong log-probs."""
from __future__ import annotations

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.models import final_hidden, output_head
from rlhf_fast.models.hidden import UnsupportedHeadError, probe_head
from rlhf_fast.models.loading import ModelLoadError, load_causal_lm

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _config(family: str):
    import transformers as tf

    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, **SMALL)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 decoder_sparse_step=1, mlp_only_layers=[], **SMALL)
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **SMALL)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=8, **SMALL)
    if family == "phi3":
        return tf.Phi3Config(pad_token_id=0, **SMALL)
    if family == "olmo2":
        return tf.Olmo2Config(**SMALL)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **SMALL)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=8, final_logit_softcapping=3.0, **SMALL)
    if family == "cohere":
        return tf.CohereConfig(logit_scale=0.25, **SMALL)
    if family == "granite":
        return tf.GraniteConfig(logits_scaling=4.0, **SMALL)
    raise AssertionError(family)


def _saved(tmp_path, family: str) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
    with torch.no_grad():  # logits large enough that soft-capping / scaling would show
        model.get_output_embeddings().weight.mul_(20.0)
    out = tmp_path / family
    model.save_pretrained(out)
    return str(out)


def _fallback_vs_hf(model) -> float:
    """max |log-prob from hidden states - HF's log_softmax(logits)| on a random batch."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 11), generator=g)
    labels = torch.randint(0, V, (3, 11), generator=g)
    with torch.no_grad():
        hf = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)
        hf = hf.gather(-1, labels[..., None])[..., 0]
        hidden = final_hidden(model, ids)
        weight, bias = output_head(model)
        ours = ops.linear_token_logprobs(hidden, weight, labels, bias=bias)
    return float((ours.double() - hf).abs().max())


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral", "gemma", "phi3", "olmo2"])
def test_accepted_architectures_match_hf_logits(tmp_path, family):
    model = load_causal_lm(_saved(tmp_path, family), "model")
    assert _fallback_vs_hf(model.eval()) < 1e-4


@pytest.mark.parametrize("family,field", [("gemma2", "final_logit_softcapping"), ("gemma3", "final_logit_softcapping"),
                                          ("cohere", "logit_scale"), ("granite", "logits_scaling")])
def test_logit_transforms_are_refused_with_one_line(tmp_path, family, field):
    path = _saved(tmp_path, family)
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(path, "sft.model")
    msg = str(e.value)
    assert "\n" not in msg and field in msg and msg.startswith("sft.model:")
    # the check also guards a model the user built in memory and passed in directly
    from transformers import AutoModelForCausalLM

    with pytest.raises(UnsupportedHeadError, match=field):
        output_head(AutoModelForCausalLM.from_config(_config(family)))


def test_llama4_text_is_refused_not_crashed():
    """Llama 4's `base_model` is the causal LM itself (no `last_hidden_state`): one line, not an AttributeError."""
    import transformers as tf

    cfg = tf.Llama4TextConfig(num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=48, head_dim=8,
                              **SMALL)
    with pytest.raises(UnsupportedHeadError, match="base_model"):
        probe_head(tf.Llama4ForCausalLM(cfg), "ppo.policy")


def test_probe_catches_a_head_no_config_field_names(tmp_path):
    """A head rlhf_fast does not know (here: logits doubled by a wrapper) is caught by comparing the model's own
    logits with lm_head(final hidden)."""
    model = load_causal_lm(_saved(tmp_path, "qwen3"), "model")
    forward = model.forward

    def doubled(*a, **kw):
        out = forward(*a, **kw)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(UnsupportedHeadError, match="differ from lm_head"):
        probe_head(model, "policy")


def test_cli_refuses_gemma2_in_one_line(tmp_path):
    """`rlhf-fast sft` on a soft-capped model: exit 2 and one line on stderr, no traceback."""
    import json
    import subprocess
    import sys

    from _chat_models import build_tokenizer

    path = _saved(tmp_path, "gemma2")
    build_tokenizer(path, bos=False, vocab_size=V + 10)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a b", "response": "c"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "sft", "--set", f"model={path}",
                          "--set", f"train_data={data}", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
    assert "Traceback" not in out.stderr and "final_logit_softcapping" in lines[-1], out.stderr[-2000:]
