"""The KV block pool: pure Python, no tensors (vLLM v1's block pool, nano-vllm's block manager).

A sequence owns a *block table*: a list of block ids, block `i` holding the K/V of its tokens
`[i * block_size, (i + 1) * block_size)`. Blocks are reference counted so the `n` samples of one prompt share the
prompt's blocks (`fork`); the one block a sample may write into while others still read it (the partial last block of
the prompt) is copied first (`append_slot` returns the copy to make: copy-on-write).

A sliding-window model's sequence gives back the blocks no future query can read (`release_before`): their table
entries become `FREED` and stay in place, so block i still holds tokens [i * block_size, (i + 1) * block_size); the
kernels never read entries before a query's window.
"""
from __future__ import annotations

from collections import deque


FREED = -1  # a table entry whose block went back to the pool (before every window that will still read the table)


class OutOfBlocks(RuntimeError):
    """No free block: the scheduler preempts a sequence and retries."""


class BlockAllocator:
    """`num_blocks` blocks of `block_size` token slots; a free list and one reference count per block."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self.peak_used = 0

    # --- queries ---
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def append_cost(self, table: list[int], position: int) -> int:
        """Free blocks `append_slot(table, position)` would take (0 or 1)."""
        index = position // self.block_size
        if index == len(table):
            return 1
        if index > len(table):
            raise ValueError(f"position {position} skips past the end of a {len(table)}-block table")
        return 1 if self._ref[table[index]] > 1 else 0

    # --- operations ---
    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks, each with reference count 1."""
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def fork(self, table: list[int]) -> list[int]:
        """A second owner of every block in `table` (prefix sharing): returns a copy of the table."""
        for b in table:
            if b == FREED:
                continue
            if self._ref[b] < 1:
                raise ValueError(f"cannot fork free block {b}")
            self._ref[b] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` (FREED entries skipped); blocks nobody references go back to
        the free list."""
        for b in table:
            if b == FREED:
                continue
            if self._ref[b] < 1:
                raise ValueError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def release_before(self, table: list[int], first: int) -> int:
        """Drop `table`'s references to its blocks 0..first-1 (no query will read them again), in place: the entries
        become FREED; a block shared with other tables stays theirs. Returns how many entries were released."""
        released = [b for b in table[:first] if b != FREED]
        self.free(released)
        table[:first] = [FREED] * min(first, len(table))
        return len(released)

    def append_slot(self, table: list[int], position: int) -> tuple[int, int] | None:
        """Make `table` able to take the token at `position` (0-based), in place.

        Appends a fresh block when `position` starts a new block; when it lands in a block other tables still share,
        swaps in a private copy and returns `(src, dst)`: the caller must copy the block's K/V before writing.
        """
        index = position // self.block_size
        if index == len(table):
            table.extend(self.allocate(1))
            return None
        if index > len(table):
            raise ValueError(f"position {position} skips past the end of a {len(table)}-block table")
        src = table[index]
        if self._ref[src] == 1:
            return None
        (dst,) = self.allocate(1)
        self._ref[src] -= 1
        table[index] = dst
        return src, dst
