"""Reward model: the SFT backbone plus a scalar head, trained on K-way rankings with the Bradley-Terry loss.

For a prompt x with K ranked completions, every pair (y_w, y_l) with rank(y_w) < rank(y_l) contributes
    loss(x) = -1/#pairs(x) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))     (InstructGPT, eq. 1)
(ties give no pair). All pairs of a prompt sit in one minibatch, and the minibatch loss is the mean of loss(x) over
its prompts.

A minibatch is scored in one padding-free forward (`rlhf_fast.models.packed`) in which each prompt is computed once
and its K completions attend to its keys and values, so autograd sums their gradients into the shared prompt; the
last layer's output projection and MLP run on each completion's last row alone. On the default task that is ~3x
fewer tokens than a padded batch (prompt ~8 tokens, K ~5 completions of ~8, padded to ~30).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_fast import distributed
from rlhf_fast.config import ConfigError, RMConfig, to_dict
from rlhf_fast.data import RankedExample, epoch_batches, load_rm
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import disable_dropout, lora
from rlhf_fast.models.loading import load_tokenizer
from rlhf_fast.models.packed import PackedBatch, pack
from rlhf_fast.precision import autocast, resolve_dtype
from rlhf_fast.stages.common import make_optimizer, make_scheduler, prepare, resolve_device, train_steps
from rlhf_fast.stages.run_state import TrainRun, exclusive, record_truncation
from rlhf_fast.truncation import context_length, fit_len

log = logging.getLogger(__name__)


class RMResult(NamedTuple):
    model_dir: Path  # ScalarHeadModel directory (HF backbone, no lm_head, + scalar_head.safetensors)
    accuracy: float  # held-out pairwise accuracy (nan without eval data)
    steps: int
    skipped_steps: int
    elapsed_s: float  # training time, summed over resumed runs


class RankedBatch(NamedTuple):
    packed: PackedBatch  # every completion of every prompt, padding-free, each prompt once (N sequences)
    better: torch.Tensor  # (P,) index into N of each pair's preferred completion
    worse: torch.Tensor  # (P,)
    weight: torch.Tensor  # (P,) 1 / (#pairs of its prompt * #prompts): the pair weights sum to 1


def ranked_batch(examples: list[RankedExample], prompts_with_pairs: int | None = None) -> RankedBatch:
    """Pack the completions of `examples` (each prompt once, its completions after it) and list all their ordered
    pairs (ties excluded). The pair weights divide by `prompts_with_pairs` (default: those of `examples`; pass the
    global batch's when `examples` is one rank's part of it)."""
    better, worse, weight = [], [], []
    if prompts_with_pairs is None:
        prompts_with_pairs = sum(1 for e in examples if len(set(e.ranks)) > 1)
    base = 0
    for e in examples:
        pairs = [(i, j) for i in range(len(e.ranks)) for j in range(len(e.ranks)) if e.ranks[i] < e.ranks[j]]
        for i, j in pairs:
            better.append(base + i)
            worse.append(base + j)
            weight.append(1.0 / (len(pairs) * prompts_with_pairs))
        base += len(e.completions)
    which = [i for i, e in enumerate(examples) for _ in e.completions]
    packed = pack([examples[i].prompt_ids for i in which], [c for e in examples for c in e.completions],
                  groups=which, share_prompts=True)
    return RankedBatch(packed, torch.tensor(better, dtype=torch.long), torch.tensor(worse, dtype=torch.long),
                       torch.tensor(weight, dtype=torch.float32))


def score(model: ScalarHeadModel, batch: RankedBatch) -> torch.Tensor:
    """The reward of every sequence of `batch`: the value at its last token, `(N,)` fp32."""
    return model(batch.packed, reads=batch.packed.last_reads())


def bradley_terry_loss(scores: torch.Tensor, batch: RankedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """scores `(N,)` -> (loss, per-pair margins `(P,)`); loss = -sum_pairs weight * log sigmoid(margin)."""
    dev = scores.device
    margin = scores[batch.better.to(dev)] - scores[batch.worse.to(dev)]  # (P,)
    return -(batch.weight.to(dev) * F.logsigmoid(margin)).sum(), margin


@torch.no_grad()
def pairwise_accuracy(model: ScalarHeadModel, examples: list[RankedExample], batch_size: int) -> float:
    """Fraction of ranked pairs the model orders like the labels (equal scores count half)."""
    was_training = model.training
    model.eval()
    right, total = 0.0, 0
    for part, real in distributed.rank_parts(examples, batch_size):  # each rank scores its part of every batch
        b = ranked_batch(part)
        margin = bradley_terry_loss(score(model, b), b)[1]
        if real:
            right += float((margin > 0).sum()) + 0.5 * float((margin == 0).sum())
            total += margin.numel()
    right, total = distributed.all_sum([right, total])
    model.train(was_training)
    return right / max(total, 1)


def step_loss(model: ScalarHeadModel, examples: list[RankedExample],
              cfg: RMConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's Bradley-Terry loss on the global batch `examples`: this rank's prompts (each with all
    its pairs) in micro-batches, every pair weighted by the global batch's prompt count, so the gradients summed
    over ranks are the one-process gradient (`distributed.accumulate`, which backpropagates each micro-batch).
    Returns (this rank's detached loss, {"train_accuracy": over the global batch's pairs})."""
    with_pairs = sum(1 for e in examples if len(set(e.ranks)) > 1)  # of the global batch
    right = []
    device = model.head.weight.device

    def loss_of(items, real):  # a rank's prompts keep all their pairs
        batch = ranked_batch(items, with_pairs)
        with autocast(cfg.mixed_precision, device):
            loss, margin = bradley_terry_loss(score(model, batch), batch)
        if real:
            right.append(((margin > 0).sum().item(), margin.numel()))
        return loss

    loss = distributed.accumulate(examples, loss_of, cfg.parallel.micro_batch_size)
    hits, pairs = distributed.all_sum([sum(r for r, _ in right), sum(n for _, n in right)])
    return loss, {"train_accuracy": float(torch.tensor(float(hits)) / max(pairs, 1))}


@exclusive
def train_rm(cfg: RMConfig, out_dir: str | Path, *, stop_after: int | None = None,
              plots: bool = True) -> RMResult:
    """Train (or resume) the reward model into `out_dir`; the final model goes to `out_dir/final`.

    `stop_after`: stop (checkpointed, resumable) after this many steps; `plots`: write the curves PNG.
    """
    out = Path(out_dir)
    if not cfg.model or not cfg.train_data:
        raise ConfigError("rm: `model` (the SFT model directory) and `train_data` are required")
    run = TrainRun("rm", out, to_dict(cfg), save_every=cfg.save_every, stop_after=stop_after,
                   keep_checkpoints=cfg.keep_checkpoints)
    if run.already_finished():
        return RMResult(out / "final", run.info["accuracy"], run.step, run.skipped, run.info["elapsed_s"])

    tokenizer = load_tokenizer(cfg.model, "rm.model")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the head's initialisation
        model = ScalarHeadModel.from_pretrained(cfg.model, new_head=True, what="rm.model")
    if cfg.lora.r:  # adapters in the backbone and the head train; the export is merged (+ adapter/ in peft's format)
        lora.apply_lora(model, cfg.lora, seed=cfg.seed)
    if not cfg.dropout:
        disable_dropout(model)
    model = prepare(model, device=resolve_device(cfg.device), parallel_cfg=cfg.parallel,
                    gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision).train()
    max_len = fit_len(cfg.max_len, context_length(model.lm))
    train = load_rm(cfg.train_data, tokenizer, max_len, overlong=cfg.overlong)
    evals = load_rm(cfg.eval_data, tokenizer, max_len, overlong=cfg.overlong) if cfg.eval_data else []
    record_truncation(out, {cfg.train_data: train, cfg.eval_data: evals})
    sizes = [sum(len(c) for c in e.completions) for e in train]
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = train_steps("rm", per_epoch, cfg.epochs, cfg.max_steps)
    params = model.trainable_parameters()
    opt = make_optimizer(params, cfg.optim)
    run.resume({"model": model}, opt, make_scheduler(opt, cfg.optim, total), total=total, tokenizer=tokenizer)

    def one_step(step: int):
        epoch, pos = divmod(step, per_epoch)
        batch_idx = epoch_batches(sizes, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        return step_loss(model, [train[i] for i in batch_idx[pos]], cfg)

    evaluate = (lambda: {"eval_accuracy": pairwise_accuracy(model, evals, cfg.batch_size)}) if evals else None
    if not run.loop(run.optimizer_step(one_step, params, cfg.optim.grad_clip), evaluate=evaluate,
                    eval_every=cfg.eval_every):
        return RMResult(run.ckpt_dir, float("nan"), run.step, run.skipped, run.elapsed())
    acc = pairwise_accuracy(model, evals, cfg.batch_size) if evals else float("nan")
    run.metrics.log(run.step, eval_accuracy=acc)
    if plots:
        run.metrics.plot(["loss", "train_accuracy", "eval_accuracy", "lr"], out / "rm_curves.png", "Reward model")
    run.finish({out / "final": model}, dtype=resolve_dtype(cfg.model_dtype, cfg.model),
               base_dirs={out / "final": cfg.model}, accuracy=acc)
    return RMResult(out / "final", acc, run.step, run.skipped, run.elapsed())
