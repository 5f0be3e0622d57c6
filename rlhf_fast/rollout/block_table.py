"""Block tables as tensors: where the allocator's Python lists become the int32 tables, context lengths and slot
mappings the model and kernels see.

Prefill (and teacher-forced scoring) builds its inputs from the lists (`prefill_inputs`); decode keeps them in a
persistent buffer (`DecodeBatch`), written in place as sequences grow, copied to the device once per step.
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


class CpuGpuBuffer:
    """A host tensor (pinned when the device is a GPU) and its device twin (vLLM v1's `CpuGpuBuffer`): the host side is
    written in place, `to_device(n)` moves its first n rows in one asynchronous copy. On CPU both are one tensor.

    The host side must not be written again before the copy has run: the engine reads every step's sampled tokens
    back (a synchronisation) before it writes the next step's rows.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.cpu = torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")
        self.device = self.cpu if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)

    def to_device(self, n: int) -> torch.Tensor:
        """The first `n` rows on the device."""
        if self.device is not self.cpu:
            self.device[:n].copy_(self.cpu[:n], non_blocking=True)
        return self.device[:n]


class DecodeBatch:
    """The decode inputs of the running sequences, kept between steps in one int32 buffer, one row per sequence in the
    scheduler's order (vLLM v1's persistent batch and block table; nano-vllm builds them anew each step).

    Row layout: [last token, position, slot, stream, block table (max_blocks entries)]. A step writes, per sequence,
    its token, position and slot and the one table entry its new token lands in (a fresh block, or the private copy
    of a shared one); a sequence's whole table is written once, when it joins. Rows move only when sequences leave
    (the survivors move up). Then one host-to-device copy; the kernels read only the table entries of a
    query's window, so entries freed before it (`allocator.FREED`) may stay stale here.

    stream: the sequence's global index (`SamplingParams` seeds its random stream with it).
    """

    TOKEN, POS, SLOT, STREAM, TABLE = range(5)

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, device: torch.device):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.buf = CpuGpuBuffer((max_rows, self.TABLE + max_blocks), torch.int32, device)
        self._tables: list[list[int]] = []  # row r's sequence's block table (the list: a new one per admission)

    def __len__(self) -> int:
        return len(self._tables)

    def update(self, tables: list[list[int]], tokens: list[int], positions: list[int], streams: list[int],
               rows: int | None = None) -> torch.Tensor:
        """The step's rows on the device, (rows, TABLE + max_blocks) int32, for sequences with block tables `tables`
        (the scheduler's lists; an admission or a preemption gives a sequence a new list), last tokens `tokens` at
        `positions`, random streams `streams`. rows (default: one per sequence): padded with copies of row 0 that
        write no K/V (slot -1), for a step compiled for a fixed batch size."""
        host, bs, n = self.buf.cpu, self.block_size, len(tables)
        rows = n if rows is None else rows
        if not n <= rows <= host.shape[0]:
            raise ValueError(f"{n} sequences padded to {rows} rows; the batch has {host.shape[0]}")
        if any(a is not b for a, b in zip(tables, self._tables)) or len(tables) != len(self._tables):
            self._rearrange(tables, streams)
        entries = [t[p // bs] for t, p in zip(tables, positions)]
        if n:
            cols = torch.tensor([p // bs + self.TABLE for p in positions])
            host[torch.arange(n), cols] = torch.tensor(entries, dtype=torch.int32)  # the blocks the tokens land in
            host[:n, :self.STREAM] = torch.tensor(
                [[tok, p, e * bs + p % bs] for tok, p, e in zip(tokens, positions, entries)], dtype=torch.int32)
        if rows > n:
            host[n:rows] = host[0]
            host[n:rows, self.SLOT] = -1
        return self.buf.to_device(rows)

    def _rearrange(self, tables: list[list[int]], streams: list[int]) -> None:
        """Rows for a new set of sequences: survivors keep their rows' contents (moved up), newcomers get theirs."""
        host = self.buf.cpu
        if len(tables) > host.shape[0]:
            raise ValueError(f"{len(tables)} sequences but the batch has {host.shape[0]} rows")
        where = {id(t): r for r, t in enumerate(self._tables)}
        old = [where.get(id(t), -1) for t in tables]
        moved = [(i, r) for i, r in enumerate(old) if 0 <= r != i]
        if moved:
            dst, src = zip(*moved)
            host[list(dst)] = host[list(src)]  # gathered before written: rows may swap
        new = [i for i, r in enumerate(old) if r < 0]
        for i in new:
            t = tables[i]
            if len(t) > self.max_blocks:
                raise ValueError(f"a block table of {len(t)} entries is wider than the batch's {self.max_blocks}")
            host[i, self.STREAM] = streams[i]
            host[i, self.TABLE:self.TABLE + len(t)] = torch.tensor(t, dtype=torch.int32)
        self._tables = list(tables)


def decode_inputs(rows: torch.Tensor, *, deterministic: bool) -> StepInputs:
    """A decode step's model inputs from its `DecodeBatch` rows (B, TABLE + max_blocks) int32: one new token per
    sequence at its position, attending to its position + 1 cached tokens."""
    pos = rows[:, DecodeBatch.POS].long()
    meta = AttnMetadata(rows[:, DecodeBatch.SLOT].long(), block_tables=rows[:, DecodeBatch.TABLE:],
                        context_lens=rows[:, DecodeBatch.POS] + 1, deterministic=deterministic)
    return StepInputs(rows[:, DecodeBatch.TOKEN].long(), pos, meta, None)
