"""Reward and value models: a causal LM's backbone with a scalar head, and no lm_head (no dead weights).

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

from rlhf_fast.models.hidden import final_hidden
from rlhf_fast.models.loading import ModelLoadError, load_backbone

HEAD_FILE = "scalar_head.safetensors"


class ScalarHeadModel(nn.Module):
    """`lm`'s final hidden states through `Linear(hidden, 1)`: one scalar per token.

    As a reward model the score is the value at each sequence's last real token; as a value model every
    response position's value is used.
    """

    def __init__(self, lm: nn.Module):
        """lm: a causal LM (only its backbone is kept) or a backbone."""
        super().__init__()
        self.lm = lm.base_model  # the decoder; a causal LM's lm_head is dropped
        hidden = self.lm.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids (B, T)` -> values `(B, T)` fp32."""
        hidden = final_hidden(self.lm, input_ids, attention_mask)  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()

    def packed(self, batch, *, deterministic: bool = False,
               reads: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One scalar per token of a `models.packed.PackedBatch` (padding-free, shared prompts), `(T,)` fp32;
        with `reads` = (rows, pos) from `batch.predict_reads` / `batch.last_reads`, the values at those rows,
        shaped like `pos`, with the last layer's output projection and MLP run on them alone."""
        from rlhf_fast.distributed import needs_hooks, root_call
        from rlhf_fast.models.packed import packed_hidden

        def run():
            if reads is None:
                return self.head(packed_hidden(self.lm, batch, deterministic=deterministic)).squeeze(-1).float()
            rows, pos = reads
            h = packed_hidden(self.lm, batch, deterministic=deterministic, rows=rows)
            return self.head(h).squeeze(-1).float()[pos.to(h.device)]

        return root_call(self, run) if needs_hooks(self) else run()  # sharded: the root's params (head, embedding)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone and head (with LoRA: the adapters and the head)."""
        return [p for p in self.parameters() if p.requires_grad]

    def score(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded `input_ids (B, T)`, `lengths (B,)` -> the value at each last real token, `(B,)`."""
        values = self(input_ids)  # (B, T)
        return values.gather(1, (lengths.to(values.device) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)

    def save_pretrained(self, path: str | Path) -> None:
        """The backbone and `scalar_head.safetensors`; with LoRA adapters (`models.lora.add_to_scalar_head`) the
        backbone merged, plus the adapters in `adapter/`."""
        if getattr(self, "peft", None) is not None:
            from rlhf_fast.models.lora import export

            export(self, path, self.head.weight.dtype)
            return
        self.lm.save_pretrained(str(path))
        self.save_head(path)

    def save_head(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.head.weight.detach().contiguous(), "bias": self.head.bias.detach().contiguous()},
                  str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, *,
                        new_head: bool = False) -> ScalarHeadModel:
        """From a directory saved by `save_pretrained`. A plain causal LM directory (no `scalar_head.safetensors`)
        is an error unless `new_head=True` asks for its backbone with a freshly initialised head (a reward model's
        start; the lm_head is not loaded)."""
        from safetensors.torch import load_file

        head_file = Path(path) / HEAD_FILE
        model = cls(load_backbone(path, "reward/value model", dtype))
        if head_file.is_file():
            try:
                state = load_file(str(head_file))
                with torch.no_grad():
                    model.head.weight.copy_(state["weight"])
                    model.head.bias.copy_(state["bias"])
            except Exception as e:
                raise ModelLoadError(f"{head_file}: cannot load the scalar head ({e})") from e
        elif not new_head:
            raise ModelLoadError(f"{path}: no {HEAD_FILE}, so this is not a reward or value model (a plain causal "
                                 f"LM, e.g. an SFT model?); train one with `rlhf-fast rm`")
        return model
