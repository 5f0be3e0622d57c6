"""Teacher-forced log-probs of given completions: one forward over prompt + completion, the trainer's view.

With `deterministic=True` the forward is the engine's batch-invariant one (fixed-chunk GEMMs; every query attends
through the paged kernel over a cache this pass fills, keys in the same order as at decode), so the result is
bitwise equal to the log-probs `RolloutEngine(..., deterministic=True)` returned, whatever the batching.

On a tensor-parallel model (`parallelize.tensor_parallel`; every rank of its tp group calls this with the same
arguments) the cache holds the rank's kv heads and the scored rows' logits are gathered over the group as the
engine gathers them (`rollout/tp.py`): (completion tokens, V) on each rank, as one process holds them.
"""
from __future__ import annotations

import torch

from rlhf_fast import ops
from rlhf_fast.models import as_decoder
from rlhf_fast.models.layers import cache_attention
from rlhf_fast.rollout import block_table, tp
from rlhf_fast.rollout.types import Completion, check_prompts

MAX_TOKENS_PER_FORWARD = 8192  # sequences are packed into forwards of at most this many tokens (one if longer)


def teacher_forced_logprobs(model, prompts: list[list[int]], completions: list, *, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0, deterministic: bool = False,
                            block_size: int = 16) -> list[torch.Tensor]:
    """Per-token log-probs of `completions[i]` after `prompts[i]`.

    Args:
        model: a `models.DecoderLM` or a transformers causal LM (same classes as `RolloutEngine`).
        prompts: list of token-id lists.
        completions: list (same length) of token-id lists or `Completion`s, each non-empty.
        temperature: log-softmax(logits / temperature) (use 1 for greedy rollouts).
        top_k, top_p: the log-probs of the distribution the rollout sampled from, cut by top-k / top-p and
            renormalised, its support recomputed from these logits (`ops.token_logprobs`); 0 / 1.0: the full one.
        deterministic: the engine's batch-invariant forward (bitwise equal to a deterministic engine's log-probs
            when `block_size` is the engine's).
    Returns:
        list of (len(completions[i]),) float32 tensors on the model's device.
    """
    lm = as_decoder(model)
    tp.check(lm, "teacher_forced_logprobs")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    comps = [c.token_ids if isinstance(c, Completion) else c for c in completions]
    if not isinstance(prompts, (list, tuple)) or len(prompts) != len(comps):
        raise ValueError(f"prompts and completions must be lists of the same length; got "
                         f"{len(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__} "
                         f"and {len(comps)}")
    prompts = check_prompts(prompts, lm.vocab_size, lm.max_context)
    comps = check_prompts(comps, lm.vocab_size, lm.max_context, name="completions")
    seqs = [p + c[:-1] for p, c in zip(prompts, comps)]  # the last completion token is only a label
    for i, s in enumerate(seqs):
        if len(s) > lm.max_context:
            raise ValueError(f"prompt + completion {i} has {len(s) + 1} tokens, over the model's context "
                             f"{lm.max_context}")
    out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    for batch in _packs([len(s) for s in seqs]):
        logps = _score_pack(lm, [seqs[i] for i in batch], [len(prompts[i]) for i in batch],
                            [comps[i] for i in batch], (temperature, top_k, top_p), deterministic, block_size)
        for i, lp in zip(batch, logps):
            out[i] = lp
    return out


def _packs(lengths: list[int]) -> list[list[int]]:
    packs, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > MAX_TOKENS_PER_FORWARD:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return packs + [cur] if cur else packs


def _score_pack(lm, seqs, prompt_lens, comps, sampling, deterministic, block_size) -> list[torch.Tensor]:
    dev = lm.device
    kv, tables = None, None
    if deterministic:  # a private cache, filled by this forward, read by the paged kernel
        tables, nxt = [], 0
        for s in seqs:
            nb = -(-len(s) // block_size)
            tables.append(list(range(nxt, nxt + nb)))
            nxt += nb
        kv = torch.empty((lm.num_layers, 2, nxt, block_size, tp.kv_heads(lm), lm.head_dim), dtype=lm.dtype,
                         device=dev)
    inputs = block_table.prefill_inputs(seqs, tables, block_size, dev, deterministic=deterministic, logits="all")
    rows, labels, start = [], [], 0
    for s, p, c in zip(seqs, prompt_lens, comps):
        rows.extend(range(start + p - 1, start + len(s)))  # positions p-1 .. p+len(c)-2 predict c
        labels.extend(c)
        start += len(s)
    logit_rows = torch.tensor(rows, dtype=torch.int64, device=dev)
    with torch.no_grad():
        h = lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, kv), deterministic, out_rows=logit_rows)
        logits = tp.logits(lm, h, deterministic)  # (sum len(c), V), gathered over a tp group as the engine's
    temperature, top_k, top_p = sampling
    logp = ops.token_logprobs(logits, torch.tensor(labels, dtype=torch.int64, device=dev), temperature=temperature,
                              top_k=top_k, top_p=top_p)
    return list(logp.float().split([len(c) for c in comps]))
