"""Block allocator (ref counts, free list, fork, copy-on-write) and the scheduler's use of it."""
import random
from collections import Counter

import pytest

from rlhf_fast.rollout.allocator import FREED, BlockAllocator, OutOfBlocks
from rlhf_fast.rollout.scheduler import Scheduler, Sequence


def check_invariants(alloc: BlockAllocator, tables: list[list[int]]) -> None:
    owners = Counter(b for t in tables for b in t)
    for b in range(alloc.num_blocks):
        assert alloc.ref_count(b) == owners.get(b, 0), b
    assert alloc.num_used == len(owners)
    free = list(alloc._free)
    assert len(free) == len(set(free)) and not set(free) & set(owners)


def test_random_alloc_fork_free_append_no_leaks():
    rng = random.Random(0)
    alloc = BlockAllocator(num_blocks=64, block_size=4)
    tables: list[list[int]] = []
    lengths: list[int] = []  # tokens each table holds
    for step in range(4000):
        op = rng.random()
        try:
            if op < 0.25 or not tables:
                n = rng.randint(1, 12)
                tables.append(alloc.allocate(alloc.blocks_for(n)))
                lengths.append(n)
            elif op < 0.45:
                i = rng.randrange(len(tables))
                tables.append(alloc.fork(tables[i]))
                lengths.append(lengths[i])
            elif op < 0.75:
                i = rng.randrange(len(tables))
                copy = alloc.append_slot(tables[i], lengths[i])
                if copy is not None:
                    src, dst = copy
                    assert alloc.ref_count(src) >= 1 and alloc.ref_count(dst) == 1 and dst in tables[i]
                lengths[i] += 1
            else:
                i = rng.randrange(len(tables))
                alloc.free(tables.pop(i))
                lengths.pop(i)
        except OutOfBlocks:
            assert alloc.num_free < 3
        if step % 97 == 0:
            check_invariants(alloc, tables)
    check_invariants(alloc, tables)
    for t in tables:
        alloc.free(t)
    assert alloc.num_free == alloc.num_blocks and all(alloc.ref_count(b) == 0 for b in range(alloc.num_blocks))
    assert alloc.peak_used <= alloc.num_blocks


def test_copy_on_write_only_for_shared_partial_block():
    alloc = BlockAllocator(num_blocks=10, block_size=4)
    a = alloc.allocate(2)  # 6 tokens: one full block, one partial
    b = alloc.fork(a)
    shared = a[1]
    assert alloc.append_slot(a, 6) == (shared, a[1])
    assert a[0] == b[0] and a[1] != b[1]  # the full block is still shared, the partial one was copied
    assert alloc.ref_count(a[0]) == 2 and alloc.ref_count(a[1]) == 1 and alloc.ref_count(b[1]) == 1
    assert alloc.append_slot(b, 6) is None  # b is the last owner of its partial block: written in place
    assert alloc.append_slot(a, 8) is None and len(a) == 3  # a new block, no copy
    with pytest.raises(ValueError, match="skips"):
        alloc.append_slot(a, 20)
    for t in (a, b):
        alloc.free(t)
    assert alloc.num_free == 10
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(11)


def test_append_slot_returns_copy_pair():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    a = alloc.allocate(1)
    b = alloc.fork(a)
    src = a[0]
    assert alloc.append_cost(b, 2) == 1
    assert alloc.append_slot(b, 2) == (src, b[0]) and b[0] != src
    assert alloc.append_cost(a, 2) == 0


def seq(i, prompt, followers=0):
    lead = Sequence(i, i, 0, list(prompt), len(prompt), None)
    lead.followers = [Sequence(i * 100 + j, i, j, list(prompt), len(prompt), None) for j in range(1, followers + 1)]
    return lead


def test_prefix_sharing_stores_prompt_blocks_once():
    alloc = BlockAllocator(num_blocks=64, block_size=16)
    sched = Scheduler(alloc, max_batch_tokens=1024, max_num_seqs=64)
    sched.add(seq(0, range(40), followers=7))  # n = 8 samples: 2 full blocks + 8 tokens
    step = sched.schedule()
    assert step.kind == "prefill" and len(step.seqs) == 1 and len(step.samplers) == 8
    assert alloc.num_used == 3 and all(alloc.ref_count(b) == 8 for b in step.seqs[0].block_table)
    for s, _ in step.samplers:  # what the engine does after the prefill
        s.num_cached = len(s.tokens)
        s.tokens.append(1)
    step = sched.schedule()
    assert step.kind == "decode" and len(step.seqs) == 8
    # full blocks still stored once; the partial block copied for 7 samples, the last owner writes in place
    assert len(step.copies) == 7 and alloc.num_used == 2 + 8
    full = step.seqs[0].block_table[:2]
    assert all(s.block_table[:2] == full for s in step.seqs) and alloc.ref_count(full[0]) == 8
    for s in list(sched.running):
        sched.finish(s, "length")
    assert alloc.num_free == 64


def test_scheduler_preempts_newest_and_respects_budget():
    alloc = BlockAllocator(num_blocks=3, block_size=4)
    sched = Scheduler(alloc, max_batch_tokens=8, max_num_seqs=8)
    a, b, c = seq(0, range(4)), seq(1, range(4)), seq(2, range(4))
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()  # budget 8 tokens: a and b only
    assert [s.seq_id for s in step.seqs] == [0, 1] and list(sched.waiting) == [c]
    for s in step.seqs:
        s.num_cached = 4
        s.tokens.append(0)
    step = sched.schedule()  # c fits in the last free block: prefill again
    assert [s.seq_id for s in step.seqs] == [2]
    c.num_cached = 4
    c.tokens.append(0)
    step = sched.schedule()  # a, b and c each need a new block, none free: c (newest), then b, are preempted
    assert step.kind == "decode" and [s.seq_id for s in step.seqs] == [0]
    assert sched.preemptions == 2 and [s.seq_id for s in sched.waiting] == [1, 2]
    assert b.block_table == [] and b.num_cached == 0 and b.tokens == list(range(4)) + [0]
    for s in list(sched.running):
        sched.finish(s, "length")
    assert alloc.num_free == 3


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockAllocator(4, 0)


def test_release_before_keeps_shared_blocks_until_the_last_owner():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    a = alloc.allocate(3)
    b = alloc.fork(a)
    assert alloc.release_before(a, 2) == 2 and a[:2] == [FREED, FREED] and a[2] == b[2]
    assert alloc.num_used == 3 and all(alloc.ref_count(x) == 1 for x in b[:2])  # b still reads them
    assert alloc.release_before(a, 2) == 0  # already released: nothing to drop twice
    assert alloc.release_before(b, 2) == 2 and alloc.num_used == 1 and alloc.ref_count(a[2]) == 2
    c = alloc.fork(a)  # forking a table with released entries references only its live blocks
    assert c[:2] == [FREED, FREED] and alloc.ref_count(a[2]) == 3
    for t in (a, b, c):
        alloc.free(t)
    assert alloc.num_free == 8


def test_scheduler_with_window_holds_the_window_only():
    """window 6, block 4: before each decode step a sequence drops the blocks before position p - 5; a prefill that
    does not read the cache allocates its window's tail only, one that does allocates every block."""
    alloc = BlockAllocator(num_blocks=16, block_size=4)
    sched = Scheduler(alloc, max_batch_tokens=64, max_num_seqs=8, window=6)
    s = seq(0, range(13))  # next query at position 13 reads 8..13: blocks 2 and 3
    sched.add(s)
    step = sched.schedule()
    assert step.kind == "prefill" and s.block_table[:2] == [FREED, FREED] and alloc.num_used == 2
    for p in range(13, 60):
        s.num_cached = p
        s.tokens.append(0)
        step = sched.schedule()
        assert step.kind == "decode"
        live = [b for b in s.block_table if b != FREED]
        assert len(s.block_table) == p // 4 + 1 and len(live) == alloc.num_used <= 3  # 6 keys span <= 3 blocks
        assert all(b == FREED for b in s.block_table[:max(0, p - 5) // 4])
    sched.finish(s, "length")
    assert alloc.num_free == 16
    det = Scheduler(alloc, max_batch_tokens=64, max_num_seqs=8, window=6, prefill_reads_cache=True)
    s = seq(1, range(13))
    det.add(s)
    det.schedule()
    assert FREED not in s.block_table and alloc.num_used == 4
    s.num_cached = 13
    s.tokens.append(0)
    det.schedule()
    assert s.block_table[:2] == [FREED, FREED] and alloc.num_used == 2
