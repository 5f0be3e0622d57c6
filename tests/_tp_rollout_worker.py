"""The rollout under tensor parallelism at world size 1 (the test process, tp 1) and under torchrun: world 2 (tp 2)
and world 4 (dp 2 x tp 2), `python -m tests._tp_rollout_worker OUT`, for `tests/test_tp_rollout.py`. Each rank writes
what it saw to `OUT/w<world>_rank<r>.pt`; the test compares the ranks and the worlds.

Per model kind (an untied Llama; a tied Qwen3 with q/k norms and a sliding window on its second layer), parallelized
as a stage prepares it (`parallelize(model, tp=2)`: FSDP2 over the dp ranks at world 4), inside
`parallelize.unsharded`, on this dp rank's prompts (dp groups generate different prompts): the engine's greedy and
sampled completions (a fixed seed, with top-k / top-p, seed None; the deterministic mode: greedy and the fixed seed);
the teacher-forced log-probs of the sampled completions (`teacher_forced_logprobs` under tp) and the trainer's (the packed forward and
`ops.vocab_parallel.head_logprobs`, the vocabulary never gathered); this rank's bytes of parameters at rest and
during the rollout, split over tp or not, and of the KV cache for a fixed number of blocks; an engine made before the
split. The Llama's gradients through the deterministic-mode forward (the split projections' batch-invariant path).
At world 1 and 2: a large-vocabulary Llama's sampled completions through the oneDNN-reordered lm_head rows.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from rlhf_fast import distributed as dist
from rlhf_fast import parallelize as par
from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs

VOCAB = 64  # each of 2 tp ranks holds 32 vocabulary rows
TP = 2
KINDS = ("llama", "qwen3")
PROMPTS = [[1, 5, 7], [9, 40, 2, 33, 34, 60, 61, 17, 32], [3] * 12, [63, 31, 32, 0, 8]]  # ids on both tp ranks' rows
NEW = 6  # tokens per completion
BLOCK, BLOCKS = 4, 48  # the KV pool of every engine here: bytes comparable across worlds
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=0.9, n=2, seed=7)  # the full distribution: the test
CUT = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_k=20, top_p=0.9, n=2, seed=11)  # replays its CDF


def config(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None)
    if kind == "llama":
        return tf.LlamaConfig(tie_word_embeddings=False, **common)
    return tf.Qwen3Config(head_dim=8, tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                          max_window_layers=1, **common)


def tiny_model(kind: str) -> nn.Module:
    """A freshly initialised tiny model of `kind`, every parameter perturbed (norms start at 1), the same weights in
    every process. The tied embedding is scaled to std 0.3 (nn.Embedding's std 1 makes a tied head's distribution
    one token)."""
    from rlhf_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(config(kind), device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            if model.lm_head.weight is model.embed.weight:
                model.embed.weight.mul_(0.3)
    return model.eval()


def my_prompts() -> tuple[list[list[int]], int]:
    """This dp rank's prompts and the global index of its first: dp groups generate different prompts."""
    per = len(PROMPTS) // dist.dp_size()
    first = dist.dp_rank() * per
    return PROMPTS[first:first + per], first


def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds of `model`'s parameters: those `tensor_parallel` splits and the others (norms)."""
    from torch.distributed.tensor import DTensor

    out = {"split": 0, "whole": 0}
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        tp_split = isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ())
        out["split" if tp_split else "whole"] += t.numel() * t.element_size()
    return out


def trainer_logprobs(model: nn.Module, prompts: list[list[int]], comps, temperature: float) -> list[torch.Tensor]:
    """The trainer's log-probs of `comps` (full distribution at `temperature`): the packed forward's hidden states of
    the rows predicting each completion token, then `head_logprobs` (vocab-parallel on a split lm_head)."""
    from rlhf_fast.models.packed import pack, packed_hidden
    from rlhf_fast.ops.vocab_parallel import head_logprobs

    lm = model
    batch = pack([prompts[c.prompt_index] for c in comps], [c.token_ids for c in comps])
    rows, labels = [], []
    for (p0, p1, r0, r1), c in zip(batch.samples, comps):
        rows += [p1 - 1] + list(range(r0, r1 - 1))  # the prompt's last row, then every response row but the last
        labels += c.token_ids
    with torch.no_grad():
        h = packed_hidden(lm, batch, rows=torch.tensor(rows))
        lp = head_logprobs(h, lm.lm_head, torch.tensor(labels), temperature=temperature)
    return list(lp.float().split([len(c.token_ids) for c in comps]))


def generated(comps, first: int) -> list[dict]:
    return [{"prompt": c.prompt_index + first, "tokens": list(c.token_ids), "logprobs": c.logprobs.clone()}
            for c in comps]


def kind_checks(kind: str) -> dict:
    model = tiny_model(kind)
    early = RolloutEngine(model, block_size=BLOCK, num_blocks=BLOCKS)  # made before the split: it follows it
    par.parallelize(model, tp=TP if dist.world_size() > 1 else 1)
    prompts, first = my_prompts()
    kw = {"first_index": first} if first else {}
    res = {"bytes_rest": local_bytes(model)}
    with par.unsharded(model):
        res["bytes_rollout"] = local_bytes(model)
        res["early"] = generated(early.generate(prompts, GREEDY, **kw), first)
        res["early_kv"] = early.kv_cache.numel() * early.kv_cache.element_size()
        for det in (False, True):
            eng = RolloutEngine(model, block_size=BLOCK, num_blocks=BLOCKS, deterministic=det)
            out = {}
            for name, params in (("greedy", GREEDY), ("sampled", SAMPLED), ("cut", CUT),
                                 ("unseeded", SamplingParams(max_new_tokens=NEW, temperature=1.0, n=2))):
                if det and name in ("cut", "unseeded"):  # the default mode's checks cover them
                    continue
                comps = eng.generate(prompts, params, **kw)
                out[name] = generated(comps, first)
                if name == "unseeded":
                    continue
                t = params.logprob_temperature if not params.greedy else 1.0
                tf = teacher_forced_logprobs(model, [prompts[c.prompt_index] for c in comps], comps,
                                             temperature=t, top_k=params.top_k, top_p=params.top_p,
                                             deterministic=det, block_size=BLOCK)
                out[name + "_tf"] = [x.clone() for x in tf]
                if name != "cut" and not det:  # the trainer's full-distribution log-probs
                    out[name + "_trainer"] = trainer_logprobs(model, prompts, comps, t)
            res["det" if det else "default"] = out
            res[("det" if det else "default") + "_kv"] = {"bytes": eng.kv_cache.numel() * eng.kv_cache.element_size(),
                                                           "shape": tuple(eng.kv_cache.shape),
                                                           "bytes_per_block": eng.bytes_per_block}
    if kind == "llama":
        res["det_grads"] = det_grads(model, prompts, res["default"]["greedy"])
    return res


def det_grads(model: nn.Module, prompts: list[list[int]], seqs: list[dict]) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient of the summed log-probs of `seqs` through the deterministic-mode forward (at
    tp, the split projections' `batch_invariant` path and its backward), summed over the dp ranks (each dp group
    scores its own prompts)."""
    from torch.distributed.tensor import DTensor

    from rlhf_fast.models.packed import pack, packed_hidden
    from rlhf_fast.ops.vocab_parallel import head_logprobs

    first = my_prompts()[1]
    batch = pack([prompts[s["prompt"] - first] for s in seqs], [s["tokens"] for s in seqs])
    rows, labels = [], []
    for (p0, p1, r0, r1), s in zip(batch.samples, seqs):
        rows += [p1 - 1] + list(range(r0, r1 - 1))
        labels += s["tokens"]
    h = packed_hidden(model, batch, deterministic=True, rows=torch.tensor(rows))
    head_logprobs(h, model.lm_head, torch.tensor(labels)).sum().backward()
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def packed_head_checks() -> dict:
    """A one-layer Llama with a 32768-token vocabulary, so that each tp rank's lm_head rows (16384 x 128) are large
    enough for the oneDNN reordered head (`rollout.tp.pack_head`, `ops._onednn.applies`): whether it applied, and
    sampled completions of all prompts."""
    import transformers as tf

    from rlhf_fast.models import build_model
    from rlhf_fast.ops import _onednn as onednn
    from rlhf_fast.rollout import tp

    cfg = tf.LlamaConfig(vocab_size=32768, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = par.parallelize(build_model(cfg, device="cpu").eval(), tp=TP if dist.world_size() > 1 else 1)
    prompts = [p + [32767, 16384] for p in PROMPTS]  # ids in both halves of the vocabulary
    with par.unsharded(model):
        packed = (tp.pack_head(model, 8) if dist.world_size() > 1 else onednn.pack(model.lm_head.weight, 8)) is not None
        comps = RolloutEngine(model, block_size=BLOCK, num_blocks=BLOCKS).generate(prompts, SAMPLED)
    return {"packed": packed, "completions": generated(comps, 0)}


def run() -> dict:
    """Every check at this world size; world size 1 (the test process) runs them at tp 1, the reference."""
    torch.set_num_threads(1)
    res = {kind: kind_checks(kind) for kind in KINDS}
    if dist.dp_size() == 1:
        res["packed_head"] = packed_head_checks()
    res.update(tp_size=dist.tp_size(), dp_size=dist.dp_size(), dp_rank=dist.dp_rank(), rank=dist.rank())
    return res


def main(out: Path) -> None:
    dist.init(timeout_s=120)
    res = run()
    torch.save(res, out / f"w{dist.world_size()}_rank{dist.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
