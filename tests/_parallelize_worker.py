"""`rlhf_fast.parallelize` at world size 1 (in the test process) and under `torchrun --nproc_per_node 2`
(`python -m tests._parallelize_worker OUT`), for `tests/test_parallelize.py`. Each rank writes what it saw to
`OUT/rank<r>.pt`; the test compares the worlds.

Per parallel spec, one packed forward + backward of a global batch of unequal sequences, cut over ranks and into two
micro-batches, each micro-batch's loss divided by the global token count (so the sum over ranks of the gradients is
the one-process gradient): the log-probs through the fused `ops.linear_token_logprobs` reading `lm_head.weight` after
the root's forward, or, for a root holding a backbone and a scalar head, a squared error of the last-token values.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from rlhf_fast import distributed as dist
from rlhf_fast import ops
from rlhf_fast import parallelize as par
from rlhf_fast.models.packed import PackedBatch, pack, packed_hidden

IGNORE = -100
VOCAB = 61
SPECS = {  # name -> (model kind, spec); compile runs the "eager" backend here (see COMPILE_BACKEND in the test)
    "shard": ("llama", par.ParallelSpec()),
    "shard_ckpt": ("llama", par.ParallelSpec(checkpointing=True)),
    "shard_ckpt_compile": ("llama", par.ParallelSpec(checkpointing=True, compile=True)),
    "tied_shard_ckpt": ("llama_tied", par.ParallelSpec(checkpointing=True)),
    "gpt2_shard_ckpt": ("gpt2", par.ParallelSpec(checkpointing=True)),
    "head_shard_ckpt": ("head", par.ParallelSpec(checkpointing=True)),
}


class HeadModel(nn.Module):
    """A DecoderLM backbone and a scalar head whose forward is the packed pass (the shape of
    `heads.ScalarHeadModel`)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, batch: PackedBatch, *, reads) -> torch.Tensor:
        rows, pos = reads
        h = hidden(self.lm, batch, rows)  # (R, hidden)
        return self.head(h).squeeze(-1).float()[pos]


def config(kind: str):
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=1)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=kind == "llama_tied", pad_token_id=0, eos_token_id=1, bos_token_id=None)


def tiny_model(kind: str = "llama") -> nn.Module:
    """A freshly initialised tiny `DecoderLM` of `kind` (llama | llama_tied | gpt2), or (head) a backbone with a
    scalar head; the same weights in every process."""
    from rlhf_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "head":
            return HeadModel(build_model(config("llama"), lm_head=False, device="cpu"))
        return build_model(config(kind), device="cpu")


def hidden(model: nn.Module, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (T or R, hidden) of `batch` through `model.__call__` (`models.packed.packed_hidden`)."""
    return packed_hidden(model, batch, rows=rows)


# --- the checks ------------------------------------------------------------------------------------------------


def global_batch() -> list[tuple[list[int], list[int]]]:
    """7 (prompt, response) pairs, 9..30 tokens, so ranks and micro-batches see very different token counts."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(7):
        p, r = int(torch.randint(2, 12, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        out.append((torch.randint(2, VOCAB, (p,), generator=g).tolist(), torch.randint(2, VOCAB, (r,),
                                                                                        generator=g).tolist()))
    return out


def micro_loss(model: nn.Module, items, n_global: int) -> torch.Tensor:
    """This micro-batch's share of the global loss: -sum of the response log-probs / global response tokens, or
    (a HeadModel) sum of squared value errors at the last tokens / global sequences."""
    prompts, responses = [p for p, _ in items], [r for _, r in items]
    batch = pack(prompts, responses, share_prompts=False)
    if isinstance(model, HeadModel):
        values = model(batch, reads=batch.last_reads())  # (N,)
        target = torch.tensor([len(r) / 10.0 for r in responses])
        return ((values - target) ** 2).sum() / n_global
    width = max(len(r) for r in responses)
    rows, pos = batch.predict_reads(width)
    h = hidden(model, batch, rows)[pos]  # (N, width, hidden)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(responses):
        labels[i, :len(r)] = torch.tensor(r)
    logp = ops.linear_token_logprobs(h, model.lm_head.weight, labels, ignore_index=IGNORE)  # after the root forward
    return -logp.sum() / n_global


def step(model: nn.Module) -> float:
    """Forward + backward of this rank's part of the global batch in 2 micro-batches; the global loss."""
    data = global_batch()
    n_global = len(data) if isinstance(model, HeadModel) else sum(len(r) for _, r in data)
    total = 0.0
    for sl in dist.micro_slices(len(data), 2):
        items = data[sl]
        loss = micro_loss(model, items or data[:1], n_global) * (1.0 if items else 0.0)  # every rank runs as many
        loss.backward()
        total += float(loss.detach())
    return dist.all_sum(total)


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, under its state-dict name."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return out


def decode_unevenly(model: nn.Module) -> dict:
    """Inside `unsharded` (entered under inference mode, which must not leak into FSDP's gathered buffers: the model
    trains afterwards), rank r runs 3 - 2r plain forwards, then the rollout engine generates 4 + 10r tokens for each
    of its prompts; profiled: the collectives and FSDP hooks seen, the generated tokens, and whether the
    parameters were plain tensors inside and sharded again after."""
    from torch.distributed.tensor import DTensor
    from torch.profiler import profile

    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    def collectives(prof) -> list[str]:
        return sorted({e.name for e in prof.events() if any(w in e.name for w in ("all_gather", "c10d", "gloo"))})

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in (3, 9, 5, 12)]
    mine = dist.rank_slice(len(prompts))
    batch = pack([prompts[0]], [prompts[1]])
    with torch.inference_mode(), par.unsharded(model):  # the first gathering of `model`
        plain = not any(isinstance(p, DTensor) for p in model.parameters())
        with profile() as forwards:
            for _ in range(3 - 2 * dist.rank()):
                hidden(model, batch)
        with profile() as rollout:
            comps = RolloutEngine(model).generate(prompts[mine], SamplingParams(max_new_tokens=4 + 10 * dist.rank(),
                                                                                seed=3), first_index=mine.start)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad(), profile() as outside:  # the control: a sharded forward all-gathers
        hidden(model, batch)
    return {"plain_inside": plain, "sharded_after": sharded, "collectives_outside": collectives(outside),
            "collectives": collectives(forwards) + collectives(rollout),
            "hooks": sum("FSDP::pre_forward" in e.name for e in forwards.events()),
            "tokens": [c.token_ids for c in comps], "after": dist.all_sum(1)}  # a collective after: nobody hung


def run(out: Path) -> dict:
    """Everything one world does (the test process at world size 1, each rank under torchrun)."""
    torch.set_num_threads(1)
    res: dict = {}
    for name, (kind, spec) in SPECS.items():
        model = par.parallelize(tiny_model(kind), spec)
        if name == "shard":
            res["decode"] = decode_unevenly(model)
        if name == "shard_ckpt":  # before any forward, nothing inside; then nested and repeated: training unharmed
            with par.unsharded(model):
                pass
            with par.unsharded(model, model), par.unsharded(model), torch.no_grad():
                for _ in range(1 + dist.rank()):
                    hidden(model, pack([[3, 4, 5]], [[6]]))
        res[name] = {"loss": step(model), "grads": full_grads(model)}
        if name == "shard_ckpt":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            opt.step()
            dist.save_state(out / f"ckpt{dist.world_size()}", {"model": model}, opt)
            res["saved"] = {k: v.clone() for k, v in dist.full_state_dict(model).items()}
    return res


def main() -> None:
    out = Path(sys.argv[1])
    dist.init(timeout_s=60)
    par.COMPILE_BACKEND = "eager"
    res = run(out)
    torch.save(res, out / f"rank{dist.rank()}.pt")


if __name__ == "__main__":
    main()
