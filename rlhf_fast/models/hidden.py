"""A Hugging Face causal LM's training-side views: final hidden states (no logits), its output projection, and
dropout switched off."""
from __future__ import annotations

import torch
from torch import nn

from rlhf_fast import distributed
from rlhf_fast.models.loading import ModelLoadError


def final_hidden(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final (normed) hidden states `(B, T, H)` of right-padded `input_ids (B, T)`; the lm_head is not run.
    On a sharded model this runs under the root's FSDP hooks, so `output_head` can be read after it."""
    dev = hf_model.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)

    def run(ids, mask):
        return hf_model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    return distributed.root_call(hf_model, run, input_ids.to(dev), attention_mask)


# Config fields with which a transformers causal LM changes its logits after `lm_head(final hidden)`, and the value
# that leaves them unchanged (None: the field off). rlhf_fast's log-probs from hidden states compute exactly
# `hidden @ W.T + b`, so a model that sets one is refused, never approximated.
_LOGIT_FIELDS = {
    "final_logit_softcapping": None,  # Gemma 2/3/3n: c * tanh(z / c)
    "logit_scale": 1.0,  # Cohere, Cohere 2: z * s
    "logits_scaling": 1.0,  # Granite, Granite MoE: z / s
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "scale_width": None,  # MiniCPM (mup): hidden / (hidden_size / dim_model_base) before the head
}


class UnsupportedHeadError(ModelLoadError):
    """A model whose logits are not `lm_head(final hidden)`; the message is one line that names the field."""


def _text_config(hf_model):
    cfg = getattr(hf_model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def check_head(hf_model, what: str = "model") -> None:
    """UnsupportedHeadError if `hf_model`'s config changes its logits after the last hidden state (soft-capping,
    logit scaling, ...) in a way the log-probs from hidden states do not apply."""
    cfg = _text_config(hf_model)
    for field, neutral in _LOGIT_FIELDS.items():
        value = getattr(cfg, field, None)
        if value is not None and value != neutral and not (field == "final_logit_softcapping" and value == 0):
            raise UnsupportedHeadError(
                f"{what}: {type(hf_model).__name__} sets {field}={value}, which changes its logits after the last "
                f"hidden state; rlhf_fast's log-probs from hidden states do not apply it yet, so the model is "
                f"refused rather than trained on wrong log-probs")


@torch.no_grad()
def probe_head(hf_model, what: str = "model", tokens: int = 8) -> None:
    """UnsupportedHeadError unless `hf_model`'s own logits on a short sequence equal `output_head(final_hidden)`:
    catches what no config field names (a custom head, a backbone that is not `base_model`)."""
    check_head(hf_model, what)
    vocab = hf_model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(tokens) * 7919 % vocab).view(1, tokens).to(hf_model.device)  # (1, T)
    was_training = hf_model.training
    hf_model.eval()
    try:
        theirs = hf_model(input_ids=ids, use_cache=False).logits.float()  # (1, T, V)
        try:
            hidden = final_hidden(hf_model, ids)  # (1, T, H)
        except (AttributeError, TypeError) as e:
            raise UnsupportedHeadError(f"{what}: {type(hf_model).__name__}: its final hidden states cannot be read "
                                       f"through `base_model` ({type(e).__name__}: {e})") from None
        weight, bias = output_head(hf_model)
        ours = torch.nn.functional.linear(hidden, weight, bias).float()
    finally:
        hf_model.train(was_training)
    scale = float(theirs.abs().max()) + 1.0
    tol = (1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2) * scale
    if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tol:
        diff = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("nan")
        raise UnsupportedHeadError(f"{what}: {type(hf_model).__name__}: its logits differ from lm_head(final hidden "
                                   f"state) by {diff:.3g} (a head rlhf_fast does not reproduce); refused rather than "
                                   f"trained on wrong log-probs")


def output_head(hf_model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias (or None); UnsupportedHeadError for a model whose logits
    are not `hidden @ W.T + b` (`check_head`)."""
    check_head(hf_model)
    head = hf_model.get_output_embeddings()
    return head.weight, head.bias


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of `model` set to 0 (`nn.Dropout` modules and the attention-probability dropout that
    attention modules keep as a float), so train-mode forwards equal eval-mode ones. Returns `model`."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model
