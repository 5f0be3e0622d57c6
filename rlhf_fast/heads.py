"""Reward and value models: rlhf_fast's decoder backbone with a scalar head, and no lm_head (no dead weights).

Saved as the Hugging Face backbone (`LlamaModel`, `Qwen2Model`, `GPT2Model`, ...: the causal LM's config, its
`architectures` naming the backbone) plus `scalar_head.safetensors` with the head's weight and bias.
`AutoModel.from_pretrained(dir)` loads exactly the saved backbone; `AutoModelForCausalLM.from_pretrained(dir)` loads
it too, with an lm_head tied to the embeddings (tied configs) or freshly initialised (reported MISSING): a scalar
head model never had a trained lm_head of its own.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf_fast.models.layers import DecoderLM, linear
from rlhf_fast.models.loading import ModelLoadError, check_family, load_model

HEAD_FILE = "scalar_head.safetensors"


class ScalarHeadModel(nn.Module):
    """`lm`'s final hidden states through `head = Linear(hidden, 1)`: one scalar per token.

    As a reward model the score is the value at each sequence's last token; as a value model every response
    position's value is used. The forward is the packed pass (`models.packed`), so under FSDP2 this module is the
    root whose hooks gather the embeddings, final norm and head around it.
    """

    def __init__(self, lm: DecoderLM):
        """lm: a `DecoderLM`; its lm_head, if any, is dropped (`lm.lm_head = None`: a backbone). The head starts at
        N(0, 1 / (hidden + 1)) weights (drawn from the global RNG) and a zero bias."""
        super().__init__()
        lm.lm_head = None
        self.lm = lm
        hidden = lm.args.hidden_size
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
            self.head.bias.zero_()

    def forward(self, batch, *, reads: tuple[torch.Tensor, torch.Tensor] | None = None,
                deterministic: bool = False) -> torch.Tensor:
        """One scalar per token of `batch` (a `models.packed.PackedBatch`: no padding, shared prompts), `(T,)` fp32;
        with `reads` = (rows, pos) from `batch.predict_reads` / `batch.last_reads`, the values at those rows, shaped
        like `pos` (the last layer's output projection and MLP run on the read rows alone). `deterministic`: the
        batch-invariant forward (`DecoderLM.forward`)."""
        from rlhf_fast.models.packed import packed_hidden

        rows, pos = reads if reads is not None else (None, None)
        h = packed_hidden(self.lm, batch, deterministic=deterministic, rows=rows)  # (T or R, hidden)
        values = linear(h, self.head.weight, self.head.bias, deterministic).squeeze(-1).float()
        return values if pos is None else values[pos.to(values.device)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone and head (with LoRA: the adapters and the head)."""
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None, tokenizer=None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The backbone as a Hugging Face directory in `dtype` (None: its own; `state_dict_adapter.save_pretrained`)
        and `scalar_head.safetensors` (the head in its own dtype), `tokenizer` beside them. `state_dict`: our names
        (`lm.*`, `head.*`), full tensors, what to write instead of the live weights (a merged LoRA export; read on
        rank 0). A sharded model is gathered: every rank calls this, rank 0 writes."""
        from rlhf_fast import distributed
        from rlhf_fast.models.state_dict_adapter import save_pretrained

        if state_dict is None:
            state_dict = distributed.full_state_dict(self)  # a collective for a sharded model; rank 0 gets it
        lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
        save_pretrained(self.lm, path, tokenizer=tokenizer, dtype=dtype, state_dict=lm_state)  # ends in a barrier
        try:
            if distributed.is_main():
                from safetensors.torch import save_file

                head = {k: state_dict[f"head.{k}"].detach().contiguous().cpu() for k in ("weight", "bias")}
                save_file(head, str(Path(path) / HEAD_FILE))
        finally:
            distributed.barrier()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = torch.float32, *,
                        new_head: bool = False, what: str = "reward/value model") -> ScalarHeadModel:
        """From a directory saved by `save_pretrained`: the backbone (`models.load_model(..., backbone=True)`, in
        `dtype`; None: the checkpoint's) and the head, both in that dtype. A plain causal LM directory (no
        `scalar_head.safetensors`) is an error unless `new_head=True` asks for its backbone with a freshly
        initialised head (a reward model's start; the lm_head is not loaded)."""
        from safetensors.torch import load_file

        head_file = Path(path) / HEAD_FILE
        if not head_file.is_file() and not new_head:
            check_family(path, what)  # the directory's own problems first (missing, not a model, not covered)
            raise ModelLoadError(f"{what}: {path}: no {HEAD_FILE}, so this is not a reward or value model (a plain "
                                 f"causal LM, e.g. an SFT model?); train one with `rlhf-fast rm`")
        model = cls(load_model(path, what, dtype=dtype, backbone=True))
        model.head.to(model.lm.dtype)
        if head_file.is_file():
            try:
                state = load_file(str(head_file))
                with torch.no_grad():
                    model.head.weight.copy_(state["weight"])
                    model.head.bias.copy_(state["bias"])
            except Exception as e:
                raise ModelLoadError(f"{what}: {head_file}: cannot load the scalar head ({e})") from e
        return model
