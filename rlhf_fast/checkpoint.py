"""Checkpoints: model and optimiser state plus everything needed for an exact resume, at any world size.

Layout of a checkpoint directory:
    state/                  models + optimiser through torch.distributed.checkpoint (DCP): one `__<rank>_0.distcp`
                            file per rank plus `.metadata`; loads at any world size (DCP reshards)
    tokenizer/              the tokenizer (when given)
    trainer_state.pt        scheduler, RNG states, step, data position, KL controller, ... (written by rank 0)
Two separate jobs: `write_models` / `read_models` are the one place that knows how model and optimiser state
become files in a directory (a sharded writer replaces just these two), and `publish` makes a directory appear
atomically: everything goes into a temporary sibling directory, which is then renamed into place, so a crash
mid-save leaves either the previous checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rlhf_fast import distributed

STATE_FILE = "trainer_state.pt"
STATE_DIR = "state"


def rng_state() -> dict:
    """Python, NumPy and torch (CPU, and CUDA when present) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model and optimiser state <-> files ---------------------------------------------------------------------


def write_models(directory: Path, models: dict, optimizer: torch.optim.Optimizer | None = None,
                 tokenizer=None) -> None:
    """`models` (name -> module, sharded or not) and the optimiser state as DCP files in `directory/state/` (every
    rank writes its shards), the tokenizer as `directory/tokenizer/` (rank 0). Called by every rank."""
    distributed.save_state(directory / STATE_DIR, models, optimizer)
    if tokenizer is not None and distributed.is_main():
        tokenizer.save_pretrained(str(directory / "tokenizer"))


def read_models(directory: Path, models: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what `write_models` wrote into the live `models` (and `optimizer`), in place, at any world size."""
    if models and not (directory / STATE_DIR / ".metadata").is_file():
        raise FileNotFoundError(f"{directory}: no {STATE_DIR}/.metadata; a checkpoint written before sharded "
                                f"checkpoints (Hugging Face model directories) cannot be resumed: delete it")
    distributed.load_state(directory / STATE_DIR, models, optimizer)


# --- atomic directories --------------------------------------------------------------------------------------


def publish(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Atomically make directory `path` hold what `write(tmp_dir)` writes (the previous `path` is replaced).
    With several processes every rank calls it: all write into one temporary directory (named by rank 0's pid),
    and rank 0 renames it into place once every rank is done (barriers before and after)."""
    path = Path(path)
    pid = distributed.all_gather_objects(os.getpid())[0]
    tmp = path.parent / f".{path.name}.tmp-{pid}"
    old = path.parent / f".{path.name}.old-{pid}"
    main = distributed.is_main()
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    write(tmp)
    distributed.barrier()
    if main:
        _fsync_dir(tmp)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return path


def save_checkpoint(path: str | Path, models: dict, state: dict, tokenizer=None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Atomically write `models`, `optimizer` and the trainer `state` to directory `path`."""
    def write(tmp: Path) -> None:
        write_models(tmp, models, optimizer, tokenizer)
        if distributed.is_main():
            torch.save(state, tmp / STATE_FILE)

    return publish(path, write)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path) -> Path | None:
    """`path` if it holds a complete checkpoint; after a crash between the two renames of a save, the previous
    checkpoint (left as `.<name>.old-*`); else None."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if (old / STATE_FILE).is_file():
            return old
    return None


def load_state(path: str | Path) -> dict:
    """The trainer state of the checkpoint at `path` (see `find_checkpoint`)."""
    return torch.load(Path(path) / STATE_FILE, weights_only=False)
