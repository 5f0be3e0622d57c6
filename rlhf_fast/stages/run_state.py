"""The bookkeeping SFT and RM share: optimiser and LR schedule, exact resume, elapsed time, checkpoint writes,
and the NaN-guarded optimiser step. The stage loops keep only their data and loss."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_fast.checkpoint import rng_state, save_checkpoint, set_rng_state
from rlhf_fast.config import OptimConfig
from rlhf_fast.stages.common import (MetricsLog, StepResult, guarded_step, make_optimizer, make_scheduler,
                                     progress)

log = logging.getLogger(__name__)


class TrainRun:
    """One stage's training state. `state` is the loaded checkpoint state (None for a fresh run); `start` is the
    `time.perf_counter()` at which this process began the stage (set before loading, so loading counts)."""

    def __init__(self, name: str, out: Path, params: list[torch.nn.Parameter], optim: OptimConfig, total: int,
                 state: dict | None, start: float):
        self.name, self.out, self.params, self.optim, self.total = name, out, params, optim, total
        self.opt = make_optimizer(params, optim)
        self.sched = make_scheduler(self.opt, optim, total)
        self.step, self.skipped = 0, 0
        self._before, self._start = 0.0, start
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.step, self.skipped, self._before = state["step"], state["skipped"], state["elapsed_s"]
            log.info("%s: resuming %s at step %d/%d", name, out, self.step, total)
        self.metrics = MetricsLog(out, "metrics", resume_step=self.step if state is not None else None)

    def elapsed(self) -> float:
        """Training seconds, summed over every process that worked on this run."""
        return self._before + time.perf_counter() - self._start

    def apply(self, loss: torch.Tensor) -> StepResult:
        """Backward + clipped optimiser step, skipped (counted, logged) on a non-finite loss or gradient."""
        res = guarded_step(loss, [self.params], self.opt, self.sched, self.optim.grad_clip)
        self.skipped += not res.applied
        self.step += 1
        if not res.applied:
            log.warning("%s: step %d skipped (non-finite loss or gradient); %d skipped so far", self.name,
                        self.step, self.skipped)
        return res

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, model, tokenizer, config: dict, *, finished: bool, **extra) -> None:
        """Atomically write the resume checkpoint (model, optimiser, schedule, RNG, position) to out/checkpoint."""
        st = {"step": self.step, "skipped": self.skipped, "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "rng": rng_state(), "finished": finished, "config": config,
              "elapsed_s": self.elapsed(), **extra}
        save_checkpoint(self.out / "checkpoint", {"model": model}, st, tokenizer)

    def loop(self, step_fn: Callable[[int], tuple], evaluate: Callable[[], dict] | None, save: Callable[[], None],
             *, eval_every: int, save_every: int, stop_after: int | None) -> bool:
        """Run optimiser steps until `total`: `step_fn(step)` returns `(loss, extra_metrics)` for the batch at that
        step; `evaluate()` gives eval metrics every `eval_every` steps; `save()` writes a resumable checkpoint every
        `save_every` steps. Returns False if it stopped early at `stop_after` (checkpointed), True when done."""
        bar = progress(total=self.total, desc=self.name, initial=self.step)
        try:
            while self.step < self.total:
                loss, extra = step_fn(self.step)
                res = self.apply(loss)
                step = self.step
                bar.update(1)
                self.metrics.log(step, loss=float(loss.detach()), **extra, grad_norm=res.grad_norm, lr=self.lr(),
                                 skipped=self.skipped)
                if step >= self.total:
                    break
                if eval_every and evaluate is not None and step % eval_every == 0:
                    self.metrics.log(step, **evaluate())
                if stop_after is not None and step >= stop_after:
                    save()
                    return False
                if save_every and step % save_every == 0:
                    save()
        finally:
            bar.close()
        return True
