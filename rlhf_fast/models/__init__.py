"""rlhf_fast's decoders: `nn.Module`s over packed tokens (`layers.DecoderLM`), one file per family.

`build_model(config)` makes one from a Hugging Face config; `load_model(dir, what)` / `save_model(model, dir)` read and
write Hugging Face directories (safetensors); `from_hf(hf_model)` converts a transformers model once, sharing its
leaf modules (no copy); `as_decoder(model)` takes either.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from rlhf_fast.models import gemma, gpt2, llama, mixtral, olmo2, phi3
from rlhf_fast.models.hidden import disable_dropout
from rlhf_fast.models.layers import AttnMetadata, DecoderLM
from rlhf_fast.models.loading import ModelLoadError, UnsupportedModelError, load_model, save_model

_FAMILIES = {  # model_type -> family
    t: fam for fam in (llama, gpt2, phi3, olmo2, gemma, mixtral) for t in fam.MODEL_TYPES}
_MODELS = {llama: llama.LlamaLM, gpt2: gpt2.GPT2LM, phi3: phi3.Phi3LM, olmo2: olmo2.Olmo2LM, gemma: gemma.GemmaLM,
           mixtral: mixtral.MixtralLM}
_BY_CLASS = {  # transformers classes from_hf converts (a bare backbone gives hidden states, no logits)
    "LlamaForCausalLM": llama, "Qwen2ForCausalLM": llama, "Qwen3ForCausalLM": llama, "MistralForCausalLM": llama,
    "GPT2LMHeadModel": gpt2, "Phi3ForCausalLM": phi3, "Olmo2ForCausalLM": olmo2, "Gemma2ForCausalLM": gemma,
    "Gemma3ForCausalLM": gemma, "MixtralForCausalLM": mixtral, "Qwen3MoeForCausalLM": mixtral,
    "LlamaModel": llama, "Qwen2Model": llama, "Qwen3Model": llama, "MistralModel": llama, "GPT2Model": gpt2,
    "Phi3Model": phi3, "Olmo2Model": olmo2, "Gemma2Model": gemma, "Gemma3TextModel": gemma,
    "MixtralModel": mixtral, "Qwen3MoeModel": mixtral,
}
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF model -> its DecoderLM


def _hf_family(cls: type):
    for c in cls.__mro__:
        if c.__name__ in _BY_CLASS and c.__module__.startswith("transformers."):
            return _BY_CLASS[c.__name__]
    return None


def supports_class(cls: type) -> bool:
    """Whether `from_hf` covers models of class `cls` (a transformers class or a subclass of one), or `cls` is one of
    ours."""
    return issubclass(cls, DecoderLM) or _hf_family(cls) is not None


def supports(model) -> bool:
    """Whether `model` is one of ours or `from_hf` covers its architecture."""
    return supports_class(type(model))


def covered_families() -> list[str]:
    """The causal-LM classes `from_hf` covers (their bare backbones too), for error messages."""
    return sorted(k for k in _BY_CLASS if k.endswith(("ForCausalLM", "LMHeadModel")))


def build_model(config, *, lm_head: bool = True, device: torch.device | str | None = None) -> DecoderLM:
    """A freshly initialised decoder for Hugging Face config `config` (Llama, Qwen2, Qwen3, Mistral, Phi-3, OLMo 2,
    Gemma 2, Gemma 3 text, GPT-2, Mixtral, Qwen3-MoE), in the default dtype, on `device` ("meta": no storage, for
    loading weights with `assign=True`). `lm_head=False`: a bare backbone (reward and value models).
    UnsupportedModelError for other architectures."""
    family = _FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UnsupportedModelError(f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) "
                                    f"is not covered: rlhf_fast's models are {', '.join(covered_families())} "
                                    "(and their backbones)")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return _MODELS[family](config, lm_head=lm_head)


def from_hf(hf_model: torch.nn.Module) -> DecoderLM:
    """The decoder of transformers model `hf_model` (a causal LM or a bare backbone of a covered family), sharing
    its leaf modules: the embeddings, norms and projections (nn.Linear, GPT-2's Conv1D, peft's LoRA layers) are
    the very same module objects, so an optimizer step on `hf_model`, peft toggling its adapters or FSDP gathering
    its parameters is what the decoder sees; nothing is copied. Converted once per `hf_model` (a weak cache); a
    later call re-shares any leaf that was replaced since (peft injecting adapters, resized embeddings)."""
    family = _hf_family(type(hf_model))
    if family is None:
        raise UnsupportedModelError(f"unsupported model class {type(hf_model).__name__}: rlhf_fast's models cover "
                                    f"{', '.join(covered_families())} (and their backbones)")
    lm = _CONVERTED.get(hf_model)
    if lm is None:
        head = hf_model.get_output_embeddings() is not None
        lm = _CONVERTED[hf_model] = build_model(hf_model.config, lm_head=head, device="meta")
    _share(lm, hf_model, family)
    return lm


def as_decoder(model: torch.nn.Module) -> DecoderLM:
    """`model` itself if it is one of ours, else `from_hf(model)`."""
    return model if isinstance(model, DecoderLM) else from_hf(model)


def module_pairs(family, num_layers: int) -> list[tuple[str, str]]:
    """(our module name, Hugging Face's relative to the backbone) of every module with parameters but `lm_head`
    (a family's table may name modules only some of its models hold: Qwen3's q/k norms; and a fused module of
    `HF_SPLIT` by the name a converted model holds it under)."""
    table = family.HF_MODULES.items()
    return [(o, t) for o, t in table if "{i}" not in o] + [
        (o.format(i=i), t.format(i=i)) for i in range(num_layers) for o, t in table if "{i}" in o]


def _unsplit(lm: DecoderLM, family) -> None:
    """Drop the parts of each fused module (`HF_SPLIT`: Phi-3's q/k/v_proj, gate/up_proj) from a converted model:
    it holds the transformers model's fused module itself (shared by `_share`), which the blocks split after the
    projection."""
    for fused, parts in getattr(family, "HF_SPLIT", {}).items():
        for i in range(lm.num_layers):
            parent = lm.get_submodule(fused.format(i=i).rpartition(".")[0])
            for part in parts:
                if part in parent._modules:
                    delattr(parent, part)


def _share(lm: DecoderLM, hf_model: torch.nn.Module, family) -> None:
    """Put `hf_model`'s leaf modules in `lm` where they are not already (about 50 us at 28 layers: called per
    `packed_hidden`). The HF containers holding them (layers, attention, MLP) are looked up once, by weak reference
    (the cache must not keep `hf_model` alive), and assumed to stay."""
    links = getattr(lm, "_hf_links", None)
    if links is None:
        inner = hf_model.base_model  # the backbone (`hf_model.model`, `.transformer`); itself for a bare one
        links = []
        for ours, theirs in module_pairs(family, lm.num_layers):
            (hf_parent, _, hf_name), (parent, _, name) = theirs.rpartition("."), ours.rpartition(".")
            hf_mod = inner.get_submodule(hf_parent)
            if hf_name not in hf_mod._modules:  # an optional module this model has not (Qwen3's q_norm in Llama)
                continue
            links.append((weakref.ref(hf_mod), hf_name, lm.get_submodule(parent), name))
        _unsplit(lm, family)
        lm._hf_links = links
        # bridge until the stages train owned models: `models.packed` runs each block under its HF layer's FSDP hooks
        lm._hf_layers = list(inner.get_submodule(family.HF_LAYERS))
    for hf_parent, hf_name, parent, name in links:
        hf_parent = hf_parent()
        if hf_parent is None:  # a container was replaced: look them up again
            del lm._hf_links
            return _share(lm, hf_model, family)
        mod = hf_parent._modules[hf_name]
        if parent._modules.get(name) is not mod:
            setattr(parent, name, mod)
    head = hf_model.get_output_embeddings()
    if head is not None and lm.lm_head is not head:
        lm.lm_head = head


__all__ = ["AttnMetadata", "DecoderLM", "ModelLoadError", "UnsupportedModelError", "as_decoder", "build_model",
           "covered_families", "disable_dropout", "from_hf", "load_model", "save_model", "supports",
           "supports_class"]
