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

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_fast import distributed
from rlhf_fast.checkpoint import (find_checkpoint, load_state, read_models, rng_state, save_checkpoint,
                                  set_rng_state)
from rlhf_fast.stages.common import MetricsLog, StepResult, guarded_step, progress

log = logging.getLogger(__name__)


class TrainRun:
    """The run directory `out` of stage `name`; `config` is recorded in every checkpoint. Construct it first (the
    clock starts, so loading counts as training time), then check `already_finished()`, then `resume(...)`."""

    def __init__(self, name: str, out: str | Path, config: dict, *, save_every: int = 0,
                 stop_after: int | None = None):
        self._start = time.perf_counter()
        self.name, self.out, self.config = name, Path(out), config
        self.save_every, self.stop_after = save_every, stop_after
        self.ckpt_dir = self.out / "checkpoint"
        self._ckpt = find_checkpoint(self.ckpt_dir)
        self.info: dict = load_state(self._ckpt) if self._ckpt else {}  # the loaded trainer state
        self.step, self.skipped = self.info.get("step", 0), self.info.get("skipped", 0)
        self._before = self.info.get("elapsed_s", 0.0)
        self.models: dict = {}
        self.opt = self.sched = self.tokenizer = None
        self.extra: dict = {}
        self.total = 0
        self.metrics: MetricsLog | None = None

    def already_finished(self) -> bool:
        """True (and a warning) when the checkpoint says the run is done."""
        if self.info.get("finished"):
            log.warning("%s: %s already finished (step %d); nothing to do. Delete it to train again.", self.name,
                        self.out, self.step)
            return True
        return False

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
        save_checkpoint(self.ckpt_dir, self.models, st, self.tokenizer, self.opt)

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

    def finish(self, exports: dict[Path, torch.nn.Module], *, dtype: torch.dtype | None = None, **info) -> None:
        """Export each final model to its directory (tokenizer beside it; weights in `dtype`, default their own),
        then mark the run finished."""
        from rlhf_fast.precision import save_in_dtype

        for path, model in exports.items():
            save = None if dtype is None else (lambda m, p: save_in_dtype(m, p, dtype))
            distributed.export_pretrained(model, path, self.tokenizer, save=save)  # full HF directories, rank 0
        mib = distributed.all_gather_objects(distributed.local_state_mib(self.models, self.opt))
        self.save(finished=True, state_mib_per_rank=mib, **info)

    def apply(self, loss: torch.Tensor, params: list[torch.nn.Parameter], grad_clip: float) -> StepResult:
        """Backward + clipped optimiser step, skipped (counted, logged) on a non-finite loss or gradient."""
        res = guarded_step(loss, [params], self.opt, self.sched, grad_clip)
        self.skipped += not res.applied
        self.step += 1
        if not res.applied:
            log.warning("%s: step %d skipped (non-finite loss or gradient); %d skipped so far", self.name,
                        self.step, self.skipped)
        return res

    def loop(self, step_fn: Callable[[int], tuple], evaluate: Callable[[], dict] | None, *,
             params: list[torch.nn.Parameter], grad_clip: float, eval_every: int) -> bool:
        """SFT's and RM's step loop: optimiser steps until `total`. `step_fn(step)` returns `(loss, extra_metrics)`
        for the batch at that step; `evaluate()` gives eval metrics every `eval_every` steps. Returns False if it
        stopped early at `stop_after` (checkpointed), True when done."""
        bar = progress(total=self.total, desc=self.name, initial=self.step)
        try:
            while self.step < self.total:
                loss, extra = step_fn(self.step)
                res = self.apply(loss, params, grad_clip)
                step = self.step
                bar.update(1)
                self.metrics.log(step, loss=distributed.all_sum(float(loss.detach())), **extra,
                                 grad_norm=res.grad_norm, lr=self.lr(), skipped=self.skipped)
                if step < self.total and eval_every and evaluate is not None and step % eval_every == 0:
                    self.metrics.log(step, **evaluate())
                if not self.after_step():
                    return False
        finally:
            bar.close()
        return True
