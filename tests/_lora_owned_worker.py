"""LoRA (`rlhf_fast.models.lora`) on a model `parallelize` shards, for `tests/test_lora_owned.py`: at world size
1 (the test process) and under `torchrun --nproc_per_node 2` (`python -m tests._lora_owned_worker OUT`). Each world
runs the packed forward + backward of `tests._parallelize_worker.step` and writes its loss, the adapters' whole
gradients, the merged state dict (rank 0) and a peft adapter directory (`OUT/<spec>-w<world>`)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlhf_fast import distributed as dist
from rlhf_fast import parallelize as par
from rlhf_fast.config import LoRAConfig
from rlhf_fast.models import lora as lo
from tests._parallelize_worker import step, tiny_model

SPECS = {"llama_shard_ckpt": ("llama", par.ParallelSpec(checkpointing=True)),
         "gpt2_shard": ("gpt2", par.ParallelSpec())}


def adapted(kind: str) -> torch.nn.Module:
    """The tiny model of `kind` with rank-2 adapters on every projection, B random: the same in every process."""
    model = tiny_model(kind)
    lo.apply_lora(model, LoRAConfig(r=2, alpha=4), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lo.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model


def run(out: Path) -> dict:
    torch.set_num_threads(1)
    res = {}
    for name, (kind, spec) in SPECS.items():
        model = par.parallelize(adapted(kind), spec)
        loss = step(model)
        grads = [lo._full(p.grad).clone() for p in lo.adapter_parameters(model)]
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        lo.save_adapter(model, out / f"{name}-w{dist.world_size()}", base_dir=None)
        res[name] = {"loss": loss, "grads": grads, "merged": lo.merged_state_dict(model),
                     "sharded": any(hasattr(p, "full_tensor") for p in lo.adapter_parameters(model))}
    return res


def main() -> None:
    out = Path(sys.argv[1])
    dist.init(timeout_s=60)
    res = run(out)
    torch.save(res, out / f"rank{dist.rank()}.pt")


if __name__ == "__main__":
    main()
