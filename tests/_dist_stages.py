"""The stages at world size 1 (the test process) and 2 (`torchrun ... -m tests._dist_stages ROOT`), for
`tests/test_distributed_stages.py`. World 1 runs first and leaves the models both worlds start RM and PPO from, and a
stopped SFT run that world 2 resumes (1 -> 2); world 2 leaves one that the test resumes at world size 1 (2 -> 1).

The tiny default task has responses of different lengths, so ranks see unequal token counts in every batch.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from rlhf_fast import distributed as dist
from rlhf_fast.config import LoRAConfig, OptimConfig, ParallelConfig, PPOConfig, RMConfig
from rlhf_fast.stages.ppo import train_ppo
from rlhf_fast.stages.rm import train_rm
from rlhf_fast.stages.sft import train_sft
from tests._tiny import TINY_TASK, tiny_sft_config

TASK = dataclasses.replace(TINY_TASK, n_sft=40, n_rm=16, n_ppo=16)


def configs(root: Path):
    """(sft, rm, ppo) configs on the task under `root/task` (written by world 1)."""
    paths = {k: str(root / "task" / "data" / f"{k}.jsonl") for k in ("sft_train", "sft_eval", "rm_train",
                                                                       "rm_eval", "ppo_prompts")}
    par = ParallelConfig(micro_batch_size=3)
    sft = tiny_sft_config(root / "task", paths, batch_size=8, epochs=1, max_steps=4, eval_every=2,
                          optim=OptimConfig(lr=3e-3, warmup_steps=1), device="cpu", parallel=par)
    rm = RMConfig(model=str(root / "sft1" / "final"), train_data=paths["rm_train"], eval_data=paths["rm_eval"],
                  batch_size=6, max_steps=2, device="cpu", parallel=par,
                  gradient_checkpointing=True)  # at N = 2: sharded and checkpointed blocks together
    ppo = PPOConfig(policy=str(root / "sft1" / "final"), reward_model=str(root / "rm1" / "final"),
                    prompts=paths["ppo_prompts"], iterations=2, prompts_per_iter=5, ppo_epochs=2, minibatch_size=4,
                    device="cpu", parallel=par, kl=dataclasses.replace(PPOConfig().kl, target=2.0),
                    sampling=dataclasses.replace(PPOConfig().sampling, max_new_tokens=6, n=2))
    return sft, rm, ppo


def lora_sft(root: Path):
    """SFT with LoRA adapters on the SFT model: sharded adapters, the merged export and `adapter/` at N = 2."""
    sft = configs(root)[0]
    return dataclasses.replace(sft, model=str(root / "sft1" / "final"), tokenizer="", max_steps=2, eval_every=0,
                               lora=LoRAConfig(r=2, alpha=4), optim=OptimConfig(lr=1e-2, warmup_steps=0))


def rm_first_step(cfg: RMConfig, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, full gradient) of `train_rm(cfg)`'s first step in `dtype`: the same initial model and first batch
    through the stage's own step (`rm.step_loss`: prepared as the stage prepares it - sharded, checkpointed -,
    padding-free, micro-batched), before any optimiser step."""
    from torch.distributed.tensor import DTensor

    from rlhf_fast.data import epoch_batches, load_rm
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models.loading import load_tokenizer
    from rlhf_fast.stages.common import prepare
    from rlhf_fast.stages.rm import step_loss

    tok = load_tokenizer(cfg.model)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = ScalarHeadModel.from_pretrained(cfg.model, dtype=dtype, new_head=True)
    model = prepare(model, device=torch.device("cpu"), parallel_cfg=cfg.parallel,
                    gradient_checkpointing=cfg.gradient_checkpointing).train()
    train = load_rm(cfg.train_data, tok, cfg.max_len)
    first = epoch_batches([sum(len(c) for c in e.completions) for e in train], cfg.batch_size, seed=cfg.seed,
                          epoch=0)[0]
    loss, _ = step_loss(model, [train[i] for i in first], cfg)  # backpropagated
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    return dist.all_sum(float(loss.detach())), grads


def prepare(root: Path) -> None:
    from rlhf_fast.default_task import build_tokenizer, write_task_data

    build_tokenizer(root / "task" / "tok")
    write_task_data(root / "task" / "data", TASK)


def run_world(root: Path) -> None:
    """Everything one world size runs; outputs under `root/<stage><world size>[suffix]`."""
    torch.set_num_threads(1)
    w = dist.world_size()
    sft, rm, ppo = configs(root)
    train_sft(sft, root / f"sft{w}", plots=False)
    train_sft(sft, root / f"sft{w}s", stop_after=2, plots=False)  # left stopped, for the other world to resume
    train_rm(rm, root / f"rm{w}", plots=False)
    train_sft(lora_sft(root), root / f"sftl{w}", plots=False)
    grads = {f"{dtype}/{micro}": rm_first_step(dataclasses.replace(rm, parallel=ParallelConfig(micro)), dtype)
             for dtype in (torch.float32, torch.float64) for micro in (0, 2)}  # micro-batches: 1 | 3 at N = 1, 1 | 2
    if dist.is_main():
        torch.save(grads, root / f"rm_grad{w}.pt")
    train_ppo(ppo, root / f"ppo{w}", plots=False)
    grpo = dataclasses.replace(ppo, algorithm="grpo", loss_agg="seq-mean-token-mean")  # critic-free, a seq-* mode
    train_ppo(grpo, root / f"grpo{w}", plots=False)
    if w == 2:
        train_sft(sft, root / "sft1s", plots=False)  # 1 -> 2
        train_ppo(ppo, root / "ppo2r", stop_after=1, plots=False)  # stop and resume at N = 2: bitwise
        train_ppo(ppo, root / "ppo2r", plots=False)


def main() -> None:
    dist.init(timeout_s=300)
    run_world(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
