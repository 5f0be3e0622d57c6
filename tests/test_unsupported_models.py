"""Models outside the covered families (`models.covered_families()`) are refused with one line that names the
covered families, never trained on a forward that is not theirs: from config.json alone before any weight is read
(`models.load_model`, every stage), and for a transformers model handed to the drop-in API (`models.from_hf`). Among
them the ones whose logits are not `lm_head(final hidden)` (Cohere's logit_scale, Granite's logits_scaling) and
Llama 4 (whose `base_model` is the causal LM itself)."""
from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import UnsupportedModelError, covered_families, from_hf, load_model

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = ["gemma", "cohere", "granite", "llama4"]


def _config(family: str):
    import transformers as tf

    if family == "gemma":
        return tf.GemmaConfig(head_dim=8, **SMALL)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **SMALL)
    if family == "cohere":
        return tf.CohereConfig(logit_scale=0.25, **SMALL)
    if family == "granite":
        return tf.GraniteConfig(logits_scaling=4.0, **SMALL)
    if family == "llama4":
        return tf.Llama4TextConfig(num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=48, head_dim=8,
                                   **SMALL)
    raise AssertionError(family)


def _hf(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)


def _saved(tmp_path, family: str) -> str:
    out = tmp_path / family
    _hf(family).save_pretrained(out)
    return str(out)


def _one_line_naming_the_families(msg: str) -> bool:
    return "\n" not in msg and all(name in msg for name in covered_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_refused_from_config_json_before_any_weight(tmp_path, family):
    path = _saved(tmp_path, family)
    for f in (tmp_path / family).glob("*.safetensors"):  # the refusal must not need them
        f.unlink()
    with pytest.raises(UnsupportedModelError) as e:
        load_model(path, "sft.model")
    msg = str(e.value)
    assert msg.startswith(f"sft.model: {path} is a ") and _one_line_naming_the_families(msg), msg
    assert f"model_type {_config(family).model_type!r}" in msg


@pytest.mark.parametrize("family", ["gemma", "cohere", "llama4"])
def test_drop_in_api_refuses_the_transformers_model(family):
    """A model built in memory and handed to the engine or the scorer (`from_hf`): one line, not an AttributeError
    from a module tree we do not know, and never a forward without its logit scaling."""
    with pytest.raises(UnsupportedModelError) as e:
        from_hf(_hf(family))
    assert _one_line_naming_the_families(str(e.value)) and type(_hf(family)).__name__ in str(e.value)


@pytest.mark.parametrize("family", ["cohere"])
def test_cli_refuses_in_one_line(tmp_path, family):
    """`rlhf-fast sft` on an uncovered family: exit 2 and one line on stderr, no traceback."""
    import json
    import subprocess
    import sys

    from _chat_models import build_tokenizer

    path = _saved(tmp_path, family)
    build_tokenizer(path, bos=False, vocab_size=V + 10)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a b", "response": "c"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "sft", "--set", f"model={path}",
                          "--set", f"train_data={data}", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
    assert "Traceback" not in out.stderr and type(_hf(family)).__name__ in lines[-1], out.stderr[-2000:]
    assert all(name in lines[-1] for name in covered_families())
