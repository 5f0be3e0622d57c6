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
from rlhf_fast.models.packed import PackedBatch, _SegmentAttention, pack

IGNORE = -100
VOCAB = 61
SPECS = {  # name -> (head model?, spec); compile runs the "eager" backend here (see COMPILE_BACKEND in the test)
    "shard": (False, par.ParallelSpec()),
    "shard_ckpt": (False, par.ParallelSpec(checkpointing=True)),
    "shard_ckpt_compile": (False, par.ParallelSpec(checkpointing=True, compile=True)),
    "head_shard_ckpt": (True, par.ParallelSpec(checkpointing=True)),
}


# --- a stand-in decoder with the DecoderLM calling contract (until rlhf_fast.models.build_model lands) ---------


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, ctx, attend, deterministic, rows=None):
        t, d = h.shape
        q, k, v = self.qkv(self.attn_norm(h)).view(t, 3, self.heads, d // self.heads).unbind(1)  # (T, H, D) each
        a = attend(0, q + ctx[:, None], k + ctx[:, None], v, (d // self.heads) ** -0.5).reshape(t, d)
        if rows is not None:
            h, a = h[rows], a[rows]
        h = h + self.o_proj(a)
        return h + self.down(torch.relu(self.up(self.mlp_norm(h))))


class _Decoder(nn.Module):
    def __init__(self, lm_head: bool, d: int = 16, heads: int = 2, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False) if lm_head else None

    def forward(self, input_ids, positions, attend, deterministic=False, out_rows=None):
        h = self.embed(input_ids)
        ctx = torch.sin(positions.to(h.dtype) / 3.0)[:, None].expand(-1, h.shape[1] // 2)  # (T, D) "rotary"
        for i, block in enumerate(self.layers):
            h = block(h, ctx, attend, deterministic, out_rows if i == len(self.layers) - 1 else None)
        return self.norm(h)


class _HeadModel(nn.Module):
    """A backbone and a scalar head (the shape of heads.ScalarHeadModel), read through `packed`, not `forward`."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.norm.weight.shape[0], 1)

    def packed(self, batch: PackedBatch, *, reads) -> torch.Tensor:
        rows, pos = reads
        h = hidden(self.lm, batch, rows)
        return self.head(h).squeeze(-1).float()[pos]


def tiny_model(head: bool = False) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lm = _Decoder(lm_head=not head)
        return _HeadModel(lm) if head else lm


def hidden(model: nn.Module, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (T or R, hidden) of `batch` through `model.__call__`."""
    return model(batch.input_ids, batch.positions, _SegmentAttention(batch, False), False, rows)


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


def micro_loss(model: nn.Module, items, n_global: int, head: bool) -> torch.Tensor:
    prompts, responses = [p for p, _ in items], [r for _, r in items]
    batch = pack(prompts, responses, share_prompts=False)
    if head:
        values = model.packed(batch, reads=batch.last_reads())  # (N,)
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


def step(model: nn.Module, head: bool) -> float:
    """Forward + backward of this rank's part of the global batch in 2 micro-batches; the global loss."""
    data = global_batch()
    n_global = len(data) if head else sum(len(r) for _, r in data)
    total = 0.0
    for sl in dist.micro_slices(len(data), 2):
        items = data[sl]
        loss = micro_loss(model, items or data[:1], n_global, head) * (1.0 if items else 0.0)
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


def decode_unevenly(model: nn.Module, steps: int) -> dict:
    """`steps` forwards inside `unsharded` (ranks pass different `steps`; entered under inference mode, which must
    not leak into FSDP's gathered buffers: the model trains afterwards), profiled: collectives and FSDP hooks seen,
    and whether the parameters were plain tensors inside and sharded again after."""
    from torch.distributed.tensor import DTensor
    from torch.profiler import profile

    def collectives(prof) -> list[str]:
        return sorted({e.name for e in prof.events() if any(w in e.name for w in ("all_gather", "c10d", "gloo"))})

    ids = torch.randint(2, VOCAB, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    batch = pack([ids[:4]], [ids[4:]])
    with torch.inference_mode(), par.unsharded(model), profile() as inside:  # the first gathering of `model`
        plain = not any(isinstance(p, DTensor) for p in model.parameters())
        for _ in range(steps):
            hidden(model, batch)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad(), profile() as outside:  # the control: a sharded forward all-gathers
        hidden(model, batch)
    return {"plain_inside": plain, "sharded_after": sharded,
            "collectives_outside": collectives(outside), "collectives": collectives(inside),
            "hooks": sum("FSDP::pre_forward" in e.name for e in inside.events())}


def run(out: Path) -> dict:
    torch.set_num_threads(1)
    res: dict = {}
    for name, (head, spec) in SPECS.items():
        model = par.parallelize(tiny_model(head), spec)
        if name == "shard" and dist.world_size() > 1:
            res["decode"] = decode_unevenly(model, 3 if dist.rank() == 0 else 1)
            res["after_decode"] = dist.all_sum(1)  # a collective after uneven decoding: nobody hung
        loss = step(model, head)
        res[name] = {"loss": loss, "grads": full_grads(model)}
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
