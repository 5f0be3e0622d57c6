"""Checkpoints: model and optimiser state plus everything needed for an exact resume, at any world size.

Layout of a checkpoint directory:
    state/                  models + optimiser through torch.distributed.checkpoint (DCP): one `__<rank>_0.distcp`
                            file per rank plus `.metadata`; loads at any world size (DCP reshards)
    tokenizer/              the tokenizer (when given)
    trainer_state.pt        scheduler, RNG states, step, data position, KL controller, ... (written by rank 0)
    manifest.json           size and sha256 of every other file in the directory, whatever wrote it
Two separate jobs: `write_models` / `read_models` are the one place that knows how model and optimiser state
become files in a directory (DCP, through `distributed.save_state` / `load_state`), and `publish` makes a directory
appear atomically: everything goes into a temporary sibling directory, which gets its manifest and is then renamed into
place, so a crash mid-save leaves the previous checkpoint or the new one, never a mix. `publish` keeps the newest
`keep` checkpoints (`checkpoint`, `checkpoint.1`, ...); `find_checkpoint` resumes from the newest one whose
manifest checks out, and warns with the path of each damaged one it skips.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rlhf_fast import distributed

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
STATE_DIR = "state"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (full disk) or read (damaged); the message names the path."""


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
        raise CheckpointError(f"{directory}: no {STATE_DIR}/.metadata: not a checkpoint this version of rlhf_fast "
                              f"wrote; it cannot be resumed (delete it, or use a new --out)")
    try:
        distributed.load_state(directory / STATE_DIR, models, optimizer)
    except distributed.DistributedError:
        raise
    except Exception as e:  # files the manifest vouches for, yet unreadable (or an earlier version's layout)
        raise CheckpointError(f"{directory / STATE_DIR}: cannot load ({type(e).__name__}: {e}); a checkpoint of an "
                              f"earlier rlhf_fast version (other model names) cannot be resumed: delete it, or use "
                              f"a new --out") from e


def share_modes(directory: Path) -> None:
    """Give files below `directory` that were created private (safetensors writes 0600) the usual mode, 0666
    less the umask, like every other file the run writes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in directory.rglob("*"):
        if p.is_file() and not p.stat().st_mode & 0o077:
            p.chmod(0o666 & ~umask)


# --- manifests -----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """`directory/manifest.json`: relative path -> {size, sha256} of every file below `directory`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=1))


def damage(directory: Path) -> str | None:
    """None if every file of `directory`'s manifest is there with its size and hash; else what is wrong, naming
    the file."""
    try:
        entries = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"{directory / MANIFEST_FILE}: missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory / MANIFEST_FILE}: unreadable ({e})"
    if STATE_FILE not in entries:
        return f"{directory / STATE_FILE}: not in the manifest"
    for rel, want in entries.items():
        f = directory / rel
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != want["size"]:
            return f"{f}: {f.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{f}: contents differ from the manifest (sha256)"
    return None


# --- atomic directories --------------------------------------------------------------------------------------


def _nth(path: Path, i: int) -> Path:
    """The i-th newest checkpoint: `path` itself, then `path.1`, `path.2`, ..."""
    return path if i == 0 else path.with_name(f"{path.name}.{i}")


def _no_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return "no space left" in str(e).lower() or ("file write failed" in str(e) and isinstance(e, RuntimeError))


def publish(path: str | Path, write: Callable[[Path], None], *, keep: int = 1) -> Path:
    """Atomically make directory `path` hold what `write(tmp_dir)` writes, plus its manifest. The previous
    `keep - 1` versions stay as `path.1`, ... (`path.1` is the newest of them); older ones are deleted.
    With several processes every rank calls it: all write into one temporary directory (named by rank 0's pid),
    and rank 0 adds the manifest and renames it into place once every rank is done (barriers before and after)."""
    path = Path(path)
    pid = distributed.all_gather_objects(os.getpid())[0]
    tmp = path.parent / f".{path.name}.tmp-{pid}"
    main = distributed.is_main()
    try:
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        distributed.barrier()
        write(tmp)
        distributed.barrier()
        if main:
            share_modes(tmp)
            write_manifest(tmp)
            _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise CheckpointError(f"{tmp}: no space left on device while writing a checkpoint (the previous "
                                  f"checkpoint {path} is intact; free some space and rerun to resume)") from e
        raise
    if main:
        keep = max(1, keep)
        for i in range(keep, 0, -1):  # path.(keep-1) -> path.keep, ..., path -> path.1
            src, dst = _nth(path, i - 1), _nth(path, i)
            if src.exists():
                shutil.rmtree(dst, ignore_errors=True)
                src.rename(dst)
        tmp.rename(path)
        _fsync_dir(path.parent)
        shutil.rmtree(_nth(path, keep), ignore_errors=True)  # one more than kept: the rename's safety copy
    distributed.barrier()
    return path


def save_checkpoint(path: str | Path, models: dict, state: dict, tokenizer=None,
                    optimizer: torch.optim.Optimizer | None = None, *, keep: int = 1) -> Path:
    """Atomically write `models`, `optimizer` and the trainer `state` to directory `path` (see `publish`)."""
    def write(tmp: Path) -> None:
        write_models(tmp, models, optimizer, tokenizer)
        if distributed.is_main():
            torch.save(state, tmp / STATE_FILE)

    return publish(path, write, keep=keep)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale(path: str | Path) -> None:
    """Remove what an interrupted save left beside checkpoint `path`: its temporary directories (and the
    `.old-*` ones of earlier versions, when `path` itself is intact). Call it only while holding the run's lock."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if path.is_dir() and damage(path) is None:
        for old in path.parent.glob(f".{path.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """The newest intact checkpoint among `path`, `path.1`, ... (each damaged one is skipped with a warning); None
    when there is none at all. Raises `CheckpointError` naming the damaged file when every one is damaged."""
    path = Path(path)
    found = [_nth(path, i) for i in range(100) if _nth(path, i).is_dir()]
    found += sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    problems = []
    for cand in found:
        why = damage(cand)
        if why is None:
            return cand
        log.warning("checkpoint %s is damaged (%s); trying an older one", cand, why)
        problems.append(why)
    if problems:
        raise CheckpointError(f"no intact checkpoint to resume from: {problems[0]}")
    return None


def load_state(path: str | Path) -> dict:
    """The trainer state of the checkpoint at `path` (see `find_checkpoint`)."""
    f = Path(path) / STATE_FILE
    try:
        return torch.load(f, weights_only=False)
    except Exception as e:  # a file the manifest vouches for, yet unreadable: name it
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from e
