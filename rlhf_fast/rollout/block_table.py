"""Block tables as tensors: the int32 tables, context lengths and slot mapping of one step, built once per step.

This is the only place where the allocator's Python lists become tensors; the model and kernels see only these.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast.models.layers import AttnMetadata


class StepInputs(NamedTuple):
    """Packed inputs of one model call. input_ids, positions (T,) int64; logit_rows (R,) int64 or None (= all)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttnMetadata
    logit_rows: torch.Tensor | None


def slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots (block * block_size + offset) of token positions [start, end) of a sequence; -1 (not
    stored) for a token whose block is FREED (before the window of every query that will read the cache)."""
    return [-1 if table[p // block_size] < 0 else table[p // block_size] * block_size + p % block_size
            for p in range(start, end)]


def table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """(len(tables), max_blocks) int32, rows padded with block 0 (never read: past the context length); FREED
    entries (-1) stay, never read either (before the query's window)."""
    width = max(1, max(len(t) for t in tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)


def prefill_inputs(token_lists: list[list[int]], tables: list[list[int]] | None, block_size: int,
                   device: torch.device, *, deterministic: bool, logits: str = "last") -> StepInputs:
    """Whole sequences from position 0 (prefill, recompute, teacher-forced scoring).

    tables None: no cache (non-deterministic scoring). deterministic: attention through the paged kernel, one block
    table row per token with context length position + 1, exactly as a decode step would see it.
    logits: "last" (one row per sequence, its last token) or "all".
    """
    ids, pos, slot, cu, qtables = [], [], [], [0], []
    for i, toks in enumerate(token_lists):
        n = len(toks)
        ids.extend(toks)
        pos.extend(range(n))
        if tables is not None:
            slot.extend(slots(tables[i], 0, n, block_size))
            if deterministic:
                qtables.extend([tables[i]] * n)
        cu.append(cu[-1] + n)
    positions = torch.tensor(pos, dtype=torch.int64, device=device)
    slot_mapping = torch.tensor(slot, dtype=torch.int64, device=device) if tables is not None else None
    if deterministic:
        if tables is None:
            raise ValueError("deterministic prefill needs block tables (attention runs over the paged cache)")
        meta = AttnMetadata(slot_mapping, block_tables=table_tensor(qtables, device),
                            context_lens=(positions + 1).to(torch.int32), deterministic=True)
    else:
        meta = AttnMetadata(slot_mapping, cu_seqlens=cu)
    rows = torch.tensor(cu[1:], dtype=torch.int64, device=device) - 1 if logits == "last" else None
    return StepInputs(torch.tensor(ids, dtype=torch.int64, device=device), positions, meta, rows)


def decode_inputs(last_tokens: list[int], positions: list[int], tables: list[list[int]], block_size: int,
                  device: torch.device, *, deterministic: bool) -> StepInputs:
    """One new token per sequence at `positions[i]`, attending to its `positions[i] + 1` cached tokens."""
    slot = [t[p // block_size] * block_size + p % block_size for t, p in zip(tables, positions)]
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    meta = AttnMetadata(torch.tensor(slot, dtype=torch.int64, device=device), block_tables=table_tensor(tables, device),
                        context_lens=(pos + 1).to(torch.int32), deterministic=deterministic)
    return StepInputs(torch.tensor(last_tokens, dtype=torch.int64, device=device), pos, meta, None)
