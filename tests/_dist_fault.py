"""A rank that raises mid-run, for `tests/test_distributed.py::test_rank_failure_keeps_the_last_checkpoint`:
`torchrun --nproc_per_node 2 -m tests._dist_fault ROOT fail|resume` runs the SFT run of `tests._dist_stages` (with
a checkpoint every 2 steps) into `ROOT/sft2f`. With `fail`, rank 1 raises right after step 3 while rank 0 goes on
into step 4's collectives; torchrun must bring the whole job down. With `resume`, the same command runs again and
resumes from the last complete checkpoint (step 2)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from rlhf_fast import distributed as dist
from rlhf_fast.stages import run_state
from rlhf_fast.stages.sft import train_sft
from tests import _dist_stages as stages

FAIL_AT = 3


def inject_fault() -> None:
    """Rank 1 raises once its step counter reaches FAIL_AT (after the step's optimiser update)."""
    after_step = run_state.TrainRun.after_step

    def failing(self) -> bool:
        ok = after_step(self)
        if dist.rank() == 1 and self.step == FAIL_AT:
            raise RuntimeError(f"injected fault on rank 1 after step {FAIL_AT}")
        return ok

    run_state.TrainRun.after_step = failing


def main() -> None:
    root, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init(timeout_s=120)
    torch.set_num_threads(1)
    if mode == "fail":
        inject_fault()
    sft = dataclasses.replace(stages.configs(root)[0], save_every=2)
    train_sft(sft, root / "sft2f", plots=False)


if __name__ == "__main__":
    main()
