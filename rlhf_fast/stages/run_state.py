"""One stage's run lifecycle, the same for SFT, RM and PPO: find and load the checkpoint, resume every model,
the optimiser, the schedule, extra state and the RNG, count elapsed time over resumed processes, checkpoint
(periodically and at `stop_after`), and finish (export the final models, mark the run finished).

    run = TrainRun("sft", out, to_dict(cfg), save_every=cfg.save_every, stop_after=stop_after)
    if run.already_finished(): ...        # nothing to do; run.info holds the finished run's state
    ... build the models, the optimiser and the schedule ...
    run.resume({"model": model}, opt, sched, total=steps, tokenizer=tok)   # loads the checkpoint into them, if any
    while run.step < run.total: ...; run.step += 1; if not run.after_step(): return  # stopped, checkpointed
    run.finish({out / "final": model}, eval_loss=...)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rlhf_fast import distributed
from rlhf_fast.checkpoint import (clean_stale, find_checkpoint, load_state, read_models, rng_state,
                                  save_checkpoint, set_rng_state, share_modes)
from rlhf_fast.config import ConfigError
from rlhf_fast.stages.common import MetricsLog, Progress, guarded_step
from rlhf_fast.truncation import Examples

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the config a run directory was started with
LOCK_FILE = ".lock"
EXTEND_KEYS = ("iterations", "epochs", "max_steps")  # raising one continues a finished run
# keys a rerun may change; parallel.tp is a layout (DCP reshards the checkpoint), like the world size
ALLOWED_CHANGES = EXTEND_KEYS + ("save_every", "eval_every", "keep_checkpoints", "device", "threads", "tp")
_held_locks: dict[str, list[int]] = {}  # run directory -> [locked file descriptor (-1: not the main rank), depth]


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (another process is running in it)."""


@contextlib.contextmanager
def run_dir_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on run directory `out` (re-entrant within a process); another process is refused
    with the holder's pid. Only the main rank of a distributed job locks."""
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held_locks or not distributed.is_main():
        _held_locks.setdefault(key, [-1, 0])[1] += 1
    else:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{out}: another run is using this directory (pid {holder}); wait for it to end or "
                              f"choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[key] = [fd, 1]
    try:
        yield
    finally:
        held = _held_locks[key]
        held[1] -= 1
        if held[1] == 0:
            del _held_locks[key]
            if held[0] >= 0:
                os.close(held[0])  # closing the file releases the lock


def exclusive(fn: Callable) -> Callable:
    """Run `fn(cfg, out_dir, ...)` holding the lock on `out_dir` (see `run_dir_lock`)."""
    @functools.wraps(fn)
    def locked(cfg, out_dir, *args, **kwargs):
        with run_dir_lock(out_dir):
            return fn(cfg, out_dir, *args, **kwargs)

    return locked


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (old value, new value) for every key whose value differs."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def write_json(path: Path, obj) -> None:
    """`obj` as `path` (JSON), written by rank 0 through a temporary file and a rename."""
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.rename(path)


TRUNCATION_FILE = "truncation.json"


def record_truncation(out: Path, loaded: dict) -> None:
    """`out/truncation.json`: {data file: what its loader kept, cut and dropped} for the `truncation.Examples` in
    `loaded` (a stage's data by file; empty paths and plain lists are skipped), so a run says how many examples
    truncation touched; the pipeline copies them into `report.json`."""
    write_json(out / TRUNCATION_FILE, {str(f): dataclasses.asdict(x.counts) for f, x in loaded.items()
                                       if f and isinstance(x, Examples)})


def read_truncation(out: Path) -> dict:
    """What `record_truncation` wrote in `out` ({} if nothing)."""
    path = out / TRUNCATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_config(out: Path, config: dict, *, name: str, started: bool) -> dict:
    """Record `config` as `out/config.json` while the run has not `started` (no checkpoint yet: a failed first
    attempt may be rerun with a fixed config); once it has, compare with the record and raise a ConfigError naming
    every changed key that is not in `ALLOWED_CHANGES`. Returns the allowed changes."""
    rec = out / CONFIG_FILE
    if not started or not rec.is_file():
        write_json(rec, config)
        return {}
    try:
        recorded = json.loads(rec.read_text())
    except ValueError as e:
        raise ConfigError(f"{rec}: unreadable ({e}); it records the config this run was started with") from None
    changes = config_changes(recorded, config)
    bad = [k for k in changes if k.rsplit(".", 1)[-1] not in ALLOWED_CHANGES]
    if bad:
        what = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in bad)
        raise ConfigError(f"{name}: {out} was started with another config ({what}). Only "
                          f"{', '.join(ALLOWED_CHANGES)} may change on a rerun; use a new --out for the rest")
    return changes


_current: TrainRun | None = None  # the stage run this process started last (for `interrupted_line`)


def interrupted_line() -> str:
    """What the CLI says on Ctrl-C: where a rerun of the same command resumes (the newest checkpoint's step)."""
    run = _current
    if run is None:
        return "interrupted before training started; rerun the same command to start"
    if run.finished:
        return f"interrupted after {run.name} finished; rerun the same command to go on from there"
    if run.saved_step is None:
        return (f"interrupted in {run.name} at step {run.step}, before its first checkpoint; rerun the same command "
                f"to start {run.name} again from step 0 (save_every=N checkpoints every N steps)")
    return (f"interrupted in {run.name} at step {run.step}; rerun the same command to resume from step "
            f"{run.saved_step} (its last checkpoint, {run.ckpt_dir})")


class TrainRun:
    """The run directory `out` of stage `name`; `config` is recorded in every checkpoint. Construct it first (the
    clock starts, so loading counts as training time), then check `already_finished()`, then `resume(...)`. The
    stage function holds the directory's lock meanwhile (`@exclusive`)."""

    def __init__(self, name: str, out: str | Path, config: dict, *, save_every: int = 0,
                 stop_after: int | None = None, keep_checkpoints: int = 2):
        self._start = time.perf_counter()
        self.name, self.out, self.config = name, Path(out), config
        self.save_every, self.stop_after, self.keep = save_every, stop_after, keep_checkpoints
        self.ckpt_dir = self.out / "checkpoint"
        log.info("%s: starting in %s", name, self.out)  # a plain line for logs that are not a terminal
        if distributed.is_main():
            clean_stale(self.ckpt_dir)
        self._ckpt = find_checkpoint(self.ckpt_dir)
        check_config(self.out, config, name=name, started=self._ckpt is not None)
        self.info: dict = load_state(self._ckpt) if self._ckpt else {}  # the loaded trainer state
        self.step, self.skipped = self.info.get("step", 0), self.info.get("skipped", 0)
        self.saved_step = self.step if self._ckpt is not None else None  # where a rerun resumes (None: the start)
        self.finished = False
        global _current
        _current = self
        self._before = self.info.get("elapsed_s", 0.0)
        self.models: dict = {}
        self.opt = self.sched = self.tokenizer = None
        self.extra: dict = {}
        self.total = 0
        self.metrics: MetricsLog | None = None

    def already_finished(self) -> bool:
        """True (and a warning) when the checkpoint says the run is done, unless this config raises one of
        `EXTEND_KEYS`: then the run continues from its last step."""
        if not self.info.get("finished"):
            return False
        extend = [k for k in config_changes(self.info["config"], self.config) if k.rsplit(".", 1)[-1] in EXTEND_KEYS]
        if extend:
            log.info("%s: %s finished at step %d; continuing (%s changed)", self.name, self.out, self.step,
                     ", ".join(extend))
            return False
        log.warning("%s: %s already finished (step %d); nothing to do. Delete it to train again.", self.name,
                    self.out, self.step)
        self.finished = True
        return True

    def resume(self, models: dict, optimizer: torch.optim.Optimizer, scheduler, *, total: int, tokenizer=None,
               extra_state: dict | None = None) -> None:
        """Attach what the checkpoint saves - `models` (name -> module), the optimiser and schedule, `extra_state`
        (name -> object with `state_dict`/`load_state_dict`, e.g. the KL controller) - and, when resuming, load
        the checkpoint into them and restore the RNG last. `total`: steps of the whole run."""
        self.models, self.opt, self.sched, self.tokenizer = models, optimizer, scheduler, tokenizer
        self.extra, self.total = dict(extra_state or {}), total
        if self._ckpt is not None:
            read_models(self._ckpt, models, optimizer)
            scheduler.load_state_dict(self.info["scheduler"])
            for key, obj in self.extra.items():
                obj.load_state_dict(self.info[key])
            set_rng_state(self.info["rng"])
            log.info("%s: resuming %s at step %d/%d", self.name, self.out, self.step, total)
        self.metrics = MetricsLog(self.out, "metrics", resume_step=self.step if self._ckpt is not None else None)

    def elapsed(self) -> float:
        """Training seconds, summed over every process that worked on this run."""
        return self._before + time.perf_counter() - self._start

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, *, finished: bool = False, **info) -> None:
        """Atomically write the resume checkpoint to `out/checkpoint`; `info`: plain values kept in its state."""
        st = {"step": self.step, "skipped": self.skipped, "scheduler": self.sched.state_dict(), "rng": rng_state(),
              "finished": finished, "config": self.config, "elapsed_s": self.elapsed(),
              **{k: obj.state_dict() for k, obj in self.extra.items()}, **info}
        save_checkpoint(self.ckpt_dir, self.models, st, self.tokenizer, self.opt, keep=self.keep)
        self.saved_step, self.finished = self.step, finished

    def after_step(self) -> bool:
        """Call once `step` has advanced: checkpoints at `stop_after` (returns False: stop now) and every
        `save_every` steps; the last step is left to `finish`."""
        if self.step >= self.total:
            return True
        if self.stop_after is not None and self.step >= self.stop_after:
            self.save()
            return False
        if self.save_every and self.step % self.save_every == 0:
            self.save()
        return True

    def finish(self, exports: dict[Path, torch.nn.Module], *, dtype: torch.dtype | None = None,
               base_dirs: dict[Path, str | Path] | None = None, **info) -> None:
        """Export each final model to its directory (`models.save_model`: a Hugging Face directory, merged plus
        `adapter/` with LoRA, the tokenizer beside it; weights in `dtype`, default their own; `base_dirs[path]`: the
        base model directory a LoRA export's adapter config names), then mark the run finished."""
        from rlhf_fast.models import save_model

        for path, model in exports.items():
            base = (base_dirs or {}).get(path)
            save_model(model, path, tokenizer=self.tokenizer, dtype=dtype, base_dir=base or None)  # rank 0 writes
            if distributed.is_main():
                share_modes(Path(path))
        mib = distributed.all_gather_objects(distributed.local_state_mib(self.models, self.opt))
        self.save(finished=True, state_mib_per_rank=mib, **info)

    def optimizer_step(self, batch_fn: Callable[[int], tuple], params: list[torch.nn.Parameter],
                       grad_clip: float) -> Callable[[int], dict]:
        """SFT's and RM's step for `run`: `batch_fn(step)` runs the forwards and backwards of the batch at that step
        (`distributed.accumulate`) and returns `(loss, extra_metrics)` (`loss`: this rank's detached share); then one
        clipped optimiser step on the accumulated gradients, skipped (counted, logged) on a non-finite loss or
        gradient. Returns the step's metrics."""
        def step(i: int) -> dict:
            loss, extra = batch_fn(i)
            res = guarded_step(loss, [params], self.opt, self.sched, grad_clip)
            self.skipped += not res.applied
            if not res.applied:
                log.warning("%s: step %d skipped (non-finite loss or gradient); %d skipped so far", self.name,
                            i + 1, self.skipped)
            return {"loss": distributed.all_sum(float(loss.detach())), **extra, "grad_norm": res.grad_norm,
                    "lr": self.lr(), "skipped": self.skipped}
        return step

    def loop(self, step_fn: Callable[[int], dict], *, show: Callable[[dict], dict] | None = None,
             evaluate: Callable[[], dict] | None = None, eval_every: int = 0) -> bool:
        """Every stage's loop, from the current step to `total`: `step_fn(step)` trains step `step` (its forwards,
        backwards and optimiser steps: `optimizer_step` for SFT and RM, an iteration for PPO) and returns its
        metrics, which are logged; `show(metrics)` picks what the progress line shows (default: all but the gradient
        norm and the skip count); `evaluate()` gives eval metrics every `eval_every` steps. Checkpoints as
        `after_step` says. Returns False if it stopped early at `stop_after` (checkpointed), True when done."""
        show = show or (lambda m: {k: v for k, v in m.items() if k not in ("grad_norm", "skipped")})
        bar = Progress(self.name, self.total, self.step)
        try:
            while self.step < self.total:
                metrics = step_fn(self.step)
                self.step += 1
                step = self.step
                bar.update(step, **show(metrics))
                self.metrics.log(step, **metrics)
                if step < self.total and eval_every and evaluate is not None and step % eval_every == 0:
                    self.metrics.log(step, **evaluate())
                if not self.after_step():
                    return False
        finally:
            bar.close()
        return True
