"""Tiny task and model for the stage tests: the default task at a few dozen examples, a 1-layer Llama."""
from __future__ import annotations

import contextlib
import json

import torch

from rlhf_fast.config import ModelArch, OptimConfig, SFTConfig, TaskConfig
from rlhf_fast.default_task import build_tokenizer, write_task_data

TINY_ARCH = ModelArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
TINY_TASK = TaskConfig(n_sft=64, n_rm=32, n_ppo=32, n_eval=16, max_items=3)


def tiny_task(root):
    """(tokenizer, data paths) under `root`."""
    tok = build_tokenizer(root / "tok")
    return tok, write_task_data(root / "data", TINY_TASK)


def tiny_sft_config(root, paths, **kw) -> SFTConfig:
    base = dict(tokenizer=str(root / "tok"), arch=TINY_ARCH, train_data=paths["sft_train"],
                eval_data=paths["sft_eval"], batch_size=8, epochs=2, optim=OptimConfig(lr=3e-3, warmup_steps=2))
    return SFTConfig(**{**base, **kw})


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to the rest of the suite)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def rows(path) -> list[dict]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in open(path)]
