"""The persistent decode batch (rollout/block_table.py) against inputs built from scratch from the allocator's lists."""
import random

import torch

from rlhf_fast.rollout.allocator import BlockAllocator
from rlhf_fast.rollout.block_table import DecodeBatch, decode_inputs


def from_scratch(tables, tokens, positions, bs):
    """The decode inputs of one step, built from the lists: ids, positions, slots, context lengths, table rows."""
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
    return tokens, positions, slots, [p + 1 for p in positions], tables


def test_matches_inputs_built_from_scratch():
    """Sequences join (whole tables), grow (fresh blocks), copy shared blocks on write, leave from any row and come
    back with a new table, over many steps; every step's rows equal a from-scratch build."""
    rnd = random.Random(0)
    bs, width = 4, 12
    alloc = BlockAllocator(400, bs)
    batch = DecodeBatch(16, width, bs, torch.device("cpu"))
    running = []  # [table, tokens, position, stream]
    next_stream = 0
    for step in range(300):
        if running and rnd.random() < 0.15:  # a sequence leaves (finishes or is preempted)
            t = running.pop(rnd.randrange(len(running)))[0]
            alloc.free(t)
        while len(running) < 16 and rnd.random() < 0.2:  # a prompt joins, maybe with a sample sharing its blocks
            n = rnd.randrange(1, 20)
            t = alloc.allocate(alloc.blocks_for(n))
            running.append([t, rnd.randrange(100), n - 1, next_stream])
            if len(running) < 16 and rnd.random() < 0.5:
                running.append([alloc.fork(t), rnd.randrange(100), n - 1, next_stream + 1])
            next_stream += 2
        for s in running:  # each advances one token: a new block, or a private copy of a shared one
            if s[2] + 1 >= width * bs:
                continue
            s[2] += 1
            s[1] = rnd.randrange(100)
            alloc.append_slot(s[0], s[2])
        rows = batch.update([s[0] for s in running], [s[1] for s in running], [s[2] for s in running],
                            [s[3] for s in running])
        inp = decode_inputs(rows, deterministic=False)
        ids, pos, slots, ctx, tables = from_scratch([s[0] for s in running], [s[1] for s in running],
                                                    [s[2] for s in running], bs)
        assert inp.input_ids.tolist() == ids and inp.input_ids.dtype == torch.int64
        assert inp.positions.tolist() == pos
        assert inp.meta.slot_mapping.tolist() == slots and inp.meta.slot_mapping.dtype == torch.int64
        assert inp.meta.context_lens.tolist() == ctx and inp.meta.context_lens.dtype == torch.int32
        bt = inp.meta.block_tables
        assert bt.dtype == torch.int32 and bt.shape == (len(running), width)
        for r, t in enumerate(tables):  # the entries a query reads: its blocks up to its own
            n = pos[r] // bs + 1
            assert bt[r, :n].tolist() == t[:n], (step, r)
        assert rows[:, DecodeBatch.STREAM].tolist() == [s[3] for s in running]
