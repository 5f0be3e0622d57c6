"""The padded Hugging Face forward as the test oracle of the stages, which train rlhf_fast's own models only.

`hf_twin(model)` is the transformers model with `model`'s weights (exported through the state-dict adapter and
loaded back by transformers, so the twin is what a user's `from_pretrained` would see); the `padded_*` functions
are the stages' passes written the plain way, on right-padded batches through the twin's own forward.
"""
from __future__ import annotations

import tempfile

import torch

from rlhf_fast.data import IGNORE_INDEX
from rlhf_fast.models import state_dict_adapter as sda


def hf_twin(model, dtype: torch.dtype | None = None):
    """A transformers model holding a copy of `model`'s weights: a causal LM for a `DecoderLM` with an lm_head, a
    bare backbone (`AutoModel`) for one without, and for a `ScalarHeadModel` (backbone, its head) as a pair."""
    from transformers import AutoModel, AutoModelForCausalLM

    lm = getattr(model, "lm", model)
    with tempfile.TemporaryDirectory() as d:
        sda.save_pretrained(lm, d, dtype=dtype)
        cls = AutoModel if lm.lm_head is None else AutoModelForCausalLM
        twin = cls.from_pretrained(d, dtype=dtype or lm.dtype).eval()
    if lm is model:
        return twin
    head = torch.nn.Linear(model.head.in_features, 1).to(model.head.weight.dtype)
    head.load_state_dict(model.head.state_dict())
    return twin, head


def _hidden(hf, input_ids: torch.Tensor) -> torch.Tensor:
    """Final normed hidden states (B, T, H) of right-padded `input_ids` (causal attention: padding is after)."""
    base = hf.base_model if hasattr(hf, "lm_head") else hf
    return base(input_ids=input_ids, use_cache=False).last_hidden_state


def padded_logprobs(hf, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of `labels` (N, R) read at `positions` (N, R) of right-padded `input_ids` (N, T);
    0 where the label is IGNORE_INDEX (a rollout's layout: `experience.Rollout`)."""
    h = _hidden(hf, input_ids)
    h = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (N, R, H)
    logp = torch.log_softmax(hf.lm_head(h).float() / temperature, -1)
    out = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return out * (labels != IGNORE_INDEX)


def padded_values(pair, input_ids: torch.Tensor) -> torch.Tensor:
    """A scalar-head twin's value at every position of right-padded `input_ids`, (N, T) fp32."""
    backbone, head = pair
    return head(_hidden(backbone, input_ids)).squeeze(-1).float()


def padded_scores(pair, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A reward-model twin's score at each sequence's last token, (N,)."""
    values = padded_values(pair, input_ids)
    return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


def twin_grads(model, twin) -> dict[str, torch.Tensor]:
    """The twin's parameter gradients under `model`'s state-dict names (transposes undone)."""
    lm = getattr(model, "lm", model)
    hf = twin[0] if isinstance(twin, tuple) else twin
    backbone = lm.lm_head is None
    theirs = dict(hf.named_parameters())
    out = {}
    for name, _ in lm.named_parameters():
        p = theirs.get(sda.to_hf_name(name, lm, backbone=backbone))
        if p is None or p.grad is None:
            continue
        out[name] = p.grad.t() if sda.is_transposed(name, lm) else p.grad
    return out


def rollout_logprobs(hf, ro, temperature: float = 1.0, **support) -> torch.Tensor:
    """`ops.linear_token_logprobs` of a rollout (`experience.Rollout`) on the twin's padded hidden states: the
    oracle of `packed_passes.policy_logprobs` (same op, same `support` arguments; only the forward differs)."""
    from rlhf_fast import ops

    h = _hidden(hf, ro.input_ids)
    h = h.gather(1, ro.positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (N, R, H)
    return ops.linear_token_logprobs(h, hf.lm_head.weight, ro.labels, bias=hf.lm_head.bias, temperature=temperature,
                                     ignore_index=IGNORE_INDEX, **support)
