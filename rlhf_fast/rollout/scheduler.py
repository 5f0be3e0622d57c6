"""Continuous batching: which sequences run this step, and the blocks they need.

Each step is either a prefill (waiting sequences join, up to a token budget and the free blocks) or a decode (every
running sequence advances one token). Finished sequences leave after every step, so waiting ones join as soon as
there is room. When a decode step runs out of blocks, the newest running sequences are preempted: their blocks are
freed and they go back to the front of the queue, to be recomputed (prefill over prompt + generated tokens) later.
The `n` samples of a prompt are admitted together: one prefill, then the samples fork the prompt's block table.

With a sliding window W (every layer of the model reads only a query's last W keys) a sequence keeps only the blocks
its next query can still read: before each decode step the blocks entirely before position p - W + 1 (p the query's
position) go back to the pool (`BlockAllocator.release_before`; shared blocks stay while another sample reads them).
A prefill that does not read the cache (the default mode: attention over the step's own keys) stores and allocates
only the blocks of its window's tail; one that does (deterministic mode) allocates them all and releases them at the
next decode. So a sequence holds about W / block_size + 1 blocks however long it grows.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from rlhf_fast.rollout.allocator import FREED, BlockAllocator


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion in flight: prompt + generated tokens, its block table and its random stream."""

    seq_id: int  # arrival order: larger = newer (preempted first)
    prompt_index: int
    sample_index: int
    tokens: list[int]  # prompt followed by the generated tokens
    num_prompt: int
    stream: int  # the sequence's global index: its random stream (rollout/philox.py)
    followers: list[Sequence] = dataclasses.field(default_factory=list)  # samples sharing this prompt's prefill
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    logprobs: list[float] = dataclasses.field(default_factory=list)
    thresholds: list[float] = dataclasses.field(default_factory=list)  # support threshold per generated token
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]


@dataclasses.dataclass
class Step:
    """What one model call computes. `samplers` pairs each sequence that samples a token with its logits row
    (followers use their leader's prefill row); `copies` are (src, dst) blocks to copy before the call."""

    kind: str  # "prefill" | "decode"
    seqs: list[Sequence]
    samplers: list[tuple[Sequence, int]]
    copies: list[tuple[int, int]]


class Scheduler:
    """window: the model's sliding window over every layer (0: none); prefill_reads_cache: prefill queries read
    the cache (deterministic mode), so a prefill needs every block of its tokens."""

    def __init__(self, allocator: BlockAllocator, max_batch_tokens: int, max_num_seqs: int, *, window: int = 0,
                 prefill_reads_cache: bool = False):
        self.allocator = allocator
        self.window = window
        self.prefill_reads_cache = prefill_reads_cache
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = min(max_num_seqs, max_batch_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def first_live_block(self, query_position: int) -> int:
        """The first block a query at `query_position` (or any later one) reads: its window's first key's."""
        if not self.window:
            return 0
        return max(0, query_position - self.window + 1) // self.allocator.block_size

    def schedule(self) -> Step:
        step = self._schedule_prefill()
        return step if step is not None else self._schedule_decode()

    def _schedule_prefill(self) -> Step | None:
        alloc = self.allocator
        seqs: list[Sequence] = []
        samplers: list[tuple[Sequence, int]] = []
        budget = self.max_batch_tokens
        while self.waiting:
            seq = self.waiting[0]
            group = 1 + len(seq.followers)
            n = len(seq.tokens)
            if seqs and (n > budget or len(self.running) + group > self.max_num_seqs):
                break
            skip = 0 if self.prefill_reads_cache else self.first_live_block(n)  # next query: position n
            if alloc.blocks_for(n) - skip > alloc.num_free:
                break
            self.waiting.popleft()
            seq.block_table = [FREED] * skip + alloc.allocate(alloc.blocks_for(n) - skip)
            row = len(seqs)
            seqs.append(seq)
            samplers.append((seq, row))
            self.running.append(seq)
            for f in seq.followers:  # prefix sharing: the samples reference the prompt's blocks
                f.block_table = alloc.fork(seq.block_table)
                samplers.append((f, row))
                self.running.append(f)
            seq.followers = []
            budget -= n
        return Step("prefill", seqs, samplers, []) if seqs else None

    def _schedule_decode(self) -> Step:
        alloc = self.allocator
        copies: list[tuple[int, int]] = []
        i = 0
        if self.window:  # give back what no query will read again, before deciding who fits
            for seq in self.running:
                alloc.release_before(seq.block_table, self.first_live_block(seq.num_cached))
        while i < len(self.running):
            seq = self.running[i]
            while alloc.append_cost(seq.block_table, seq.num_cached) > alloc.num_free:
                victim = self.running.pop()  # the newest; may be `seq` itself
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                copy = alloc.append_slot(seq.block_table, seq.num_cached)
                if copy is not None:
                    copies.append(copy)
                i += 1
        return Step("decode", list(self.running), [(s, r) for r, s in enumerate(self.running)], copies)

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.allocator.free(seq.block_table)
        seq.block_table = []
        self.running.remove(seq)
