"""`state_dict_adapter.save_pretrained` of an FSDP2-sharded model, under `torchrun --nproc_per_node 2` (CPU gloo):
`python -m tests._sda_fsdp_worker SRC OUT [SRC OUT ...]` loads each HF directory SRC with `load_pretrained`, shards
every block and the root with `fully_shard`, and exports it to OUT (every rank calls; rank 0 writes)."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from rlhf_fast.models.state_dict_adapter import load_pretrained, save_pretrained


def main(pairs: list[str]) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for src, out in zip(pairs[::2], pairs[1::2]):
        model = load_pretrained(src)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
        save_pretrained(model, out, max_shard_bytes=30_000)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
