"""Supervised fine-tuning: next-token cross-entropy on response tokens only, through the fused log-prob op.

loss = -(1 / #response tokens) * sum_t log p(y_t | x, y_<t), over the trained tokens (the response, or a chat's
trained assistant turns), computed on the packed forward (`models.packed`: no padding; the last layer's output
projection and MLP run on the rows that predict a trained token only) by `ops.linear_token_logprobs` from those
rows' final hidden states and the lm_head, so no `(tokens, vocab)` tensor exists (under tensor parallelism,
`ops.vocab_parallel`: each rank its vocabulary rows, `parallel.tp`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf_fast import distributed
from rlhf_fast.config import ConfigError, SFTConfig, to_dict
from rlhf_fast.data import IGNORE_INDEX, SFTExample, epoch_batches, load_sft
from rlhf_fast.models import load_model, lora
from rlhf_fast.models.loading import load_tokenizer
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.ops.vocab_parallel import head_logprobs
from rlhf_fast.precision import autocast, resolve_dtype
from rlhf_fast.stages.common import make_optimizer, make_scheduler, prepare, resolve_device, train_steps
from rlhf_fast.stages.run_state import TrainRun, exclusive, record_truncation
from rlhf_fast.truncation import context_length, fit_len

log = logging.getLogger(__name__)


class SFTResult(NamedTuple):
    model_dir: Path  # HF model + tokenizer
    eval_loss: float  # nan without eval data
    steps: int
    skipped_steps: int  # NaN/Inf guard
    elapsed_s: float  # training time, summed over resumed runs


def trained_positions(example: SFTExample) -> list[int]:
    """The positions j >= 1 of `example.input_ids` whose token is trained: `spans` (multi-turn), else
    [prompt_len, len)."""
    n = len(example.input_ids)
    spans = example.spans or ((example.prompt_len, n),)
    return sorted({j for a, z in spans for j in range(max(a, 1), min(z, n))})


def response_nll(model, examples: list[SFTExample], *,
                 deterministic: bool = False) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood of the trained tokens of `examples`, their count) under `model` (a
    `DecoderLM` with an lm_head). The examples are packed into one stream (each its own segment); token j is
    predicted by its sequence's row j - 1, and only those rows go through the last layer's MLP and the lm_head."""
    batch = pack([e.input_ids for e in examples], [[] for _ in examples])
    rows, labels = [], []
    for (start, _, _, _), e in zip(batch.samples, examples):
        for j in trained_positions(e):
            rows.append(start + j - 1)
            labels.append(e.input_ids[j])
    count = len(labels)
    if not count:  # nothing trained (a stand-in item): a zero loss that still runs the forward and backward
        rows, labels = [0], [IGNORE_INDEX]
    h = packed_hidden(model, batch, deterministic=deterministic, rows=torch.tensor(rows))  # (R, hidden)
    target = torch.tensor(labels, device=h.device)
    # after the forward (a sharded root has gathered the head); a tensor-parallel head: its vocabulary rows only
    logp = head_logprobs(h, model.lm_head, target, ignore_index=IGNORE_INDEX,
                         softcap=model.final_logit_softcap)  # (R,)
    nll = -logp.sum()
    return (nll if count else nll + 0.0 * h.sum()), count


@torch.no_grad()
def eval_loss(model, examples: list[SFTExample], batch_size: int) -> float:
    """Token-weighted mean response NLL over `examples` (each rank scores its part of every batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for part, real in distributed.rank_parts(examples, batch_size):
        nll, n = response_nll(model, part)
        if real:
            total, count = total + float(nll), count + n
    total, count = distributed.all_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def _load_model(cfg: SFTConfig, tokenizer):
    from rlhf_fast.default_task import build_model

    if cfg.model:
        return load_model(cfg.model, "sft.model")
    return build_model(cfg.arch, tokenizer, seed=cfg.seed)


@exclusive
def train_sft(cfg: SFTConfig, out_dir: str | Path, *, stop_after: int | None = None,
              plots: bool = True) -> SFTResult:
    """Train (or resume) SFT into `out_dir`; the final model goes to `out_dir/final`.

    `stop_after`: stop (checkpointed, resumable) once this many optimiser steps are done; `plots`: write the
    stage's curves PNG.
    """
    out = Path(out_dir)
    if not (cfg.tokenizer or cfg.model):
        raise ConfigError("sft: set `model` (a HF model directory) or `tokenizer` (to train `arch` from scratch)")
    if not cfg.train_data:
        raise ConfigError("sft.train_data: required")
    run = TrainRun("sft", out, to_dict(cfg), save_every=cfg.save_every, stop_after=stop_after,
                   keep_checkpoints=cfg.keep_checkpoints)
    if run.already_finished():
        return SFTResult(out / "final", run.info["eval_loss"], run.step, run.skipped, run.info["elapsed_s"])

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, "sft.tokenizer" if cfg.tokenizer else "sft.model")
    model = _load_model(cfg, tokenizer)
    if cfg.lora.r:  # only the adapters train; the final export is the merged model (+ adapter/ in peft's format)
        lora.apply_lora(model, cfg.lora, seed=cfg.seed)
    device = resolve_device(cfg.device)
    model = prepare(model, device=device, parallel_cfg=cfg.parallel,
                    gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision).train()
    max_len = fit_len(cfg.max_len, context_length(model))
    kw = dict(overlong=cfg.overlong, assistant_turns=cfg.assistant_turns)
    train = load_sft(cfg.train_data, tokenizer, max_len, **kw)
    evals = load_sft(cfg.eval_data, tokenizer, max_len, **kw) if cfg.eval_data else []
    record_truncation(out, {cfg.train_data: train, cfg.eval_data: evals})
    lengths = [len(e.input_ids) for e in train]
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = train_steps("sft", per_epoch, cfg.epochs, cfg.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optim)
    run.resume({"model": model}, opt, make_scheduler(opt, cfg.optim, total), total=total, tokenizer=tokenizer)

    def one_step(step: int):
        epoch, pos = divmod(step, per_epoch)
        batch_idx = epoch_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch, bucket_size=cfg.bucket_size)
        batch = [train[i] for i in batch_idx[pos]]
        n = max(sum(len(trained_positions(e)) for e in batch), 1)  # the global batch's trained tokens

        def loss_of(items, real):  # this rank's share of the global mean
            with autocast(cfg.mixed_precision, device):
                return response_nll(model, items)[0] / n

        return distributed.accumulate(batch, loss_of, cfg.parallel.micro_batch_size), {}

    evaluate = (lambda: {"eval_loss": eval_loss(model, evals, cfg.batch_size)}) if evals else None
    if not run.loop(run.optimizer_step(one_step, params, cfg.optim.grad_clip), evaluate=evaluate,
                    eval_every=cfg.eval_every):
        return SFTResult(run.ckpt_dir, float("nan"), run.step, run.skipped, run.elapsed())
    ev = eval_loss(model, evals, cfg.batch_size) if evals else float("nan")
    run.metrics.log(run.step, eval_loss=ev)
    if plots:
        run.metrics.plot(["loss", "eval_loss", "lr", "grad_norm"], out / "sft_curves.png", "SFT")
    run.finish({out / "final": model}, dtype=resolve_dtype(cfg.model_dtype, cfg.model),
               base_dirs={out / "final": cfg.model}, eval_loss=ev)
    return SFTResult(out / "final", ev, run.step, run.skipped, run.elapsed())
