"""Supervised fine-tuning: next-token cross-entropy on response tokens only, through the fused log-prob op.

loss = -(1 / #response tokens) * sum_t log p(y_t | x, y_<t), with the prompt masked by `ignore_index`, computed by
`ops.linear_token_logprobs` from the final hidden states and the lm_head, so no `(tokens, vocab)` tensor exists.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf_fast import distributed, ops, precision
from rlhf_fast.config import ConfigError, SFTConfig, to_dict
from rlhf_fast.data import IGNORE_INDEX, SFTExample, epoch_batches, load_sft, sft_batch
from rlhf_fast.models import final_hidden, lora, output_head
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.lora import LoRALM
from rlhf_fast.stages.common import make_optimizer, make_scheduler, resolve_device, train_steps
from rlhf_fast.stages.run_state import TrainRun, exclusive, record_truncation
from rlhf_fast.truncation import context_length, fit_len

log = logging.getLogger(__name__)


class SFTResult(NamedTuple):
    model_dir: Path  # HF model + tokenizer
    eval_loss: float  # nan without eval data
    steps: int
    skipped_steps: int  # NaN/Inf guard
    elapsed_s: float  # training time, summed over resumed runs


def response_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens and their count.

    input_ids `(B, T)` right-padded; labels `(B, T-1)` with `IGNORE_INDEX` on prompt and padding.
    """
    hidden = final_hidden(model, input_ids)[:, :-1]  # (B, T-1, H): position t predicts token t+1
    weight, bias = output_head(model)
    labels = labels.to(hidden.device)
    logp = ops.linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX)  # (B, T-1) fp32
    return -logp.sum(), (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def eval_loss(model, examples: list[SFTExample], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean response NLL over `examples` (each rank scores its part of every batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for part, real in distributed.rank_parts(examples, batch_size):
        nll, n = response_nll(model, *sft_batch(part, pad_id))
        if real:
            total, count = total + float(nll), count + int(n)
    total, count = distributed.all_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def _load_model(cfg: SFTConfig, tokenizer):
    from rlhf_fast.default_task import build_model

    if cfg.model:
        return load_causal_lm(cfg.model, "sft.model")
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
        lora.refuse_sharded()
        model = LoRALM.wrap(model, cfg.lora, cfg.model, seed=cfg.seed)
    model.to(resolve_device(cfg.device)).train()
    if cfg.gradient_checkpointing:
        precision.enable_gradient_checkpointing(model)
    device = resolve_device(cfg.device)
    model = distributed.shard(model, mixed_precision=precision.autocast_on(cfg.mixed_precision, device))
    lm = getattr(model, "lm", model)  # the HF causal LM that runs (inside LoRALM with adapters)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = fit_len(cfg.max_len, context_length(lm))
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
        n = (sft_batch(batch, pad_id)[1] != IGNORE_INDEX).sum().clamp(min=1)  # the global batch's tokens

        def loss_of(items, real):  # this rank's share of the global mean
            with precision.autocast(cfg.mixed_precision, lm.device):
                nll = response_nll(lm, *sft_batch(items, pad_id))[0]
            return nll / n

        return distributed.accumulate(batch, loss_of, cfg.parallel.micro_batch_size), {}

    evaluate = (lambda: {"eval_loss": eval_loss(lm, evals, pad_id, cfg.batch_size)}) if evals else None
    if not run.loop(one_step, evaluate, params=params, grad_clip=cfg.optim.grad_clip, eval_every=cfg.eval_every):
        return SFTResult(run.ckpt_dir, float("nan"), run.step, run.skipped, run.elapsed())
    ev = eval_loss(lm, evals, pad_id, cfg.batch_size) if evals else float("nan")
    run.metrics.log(run.step, eval_loss=ev)
    if plots:
        run.metrics.plot(["loss", "eval_loss", "lr", "grad_norm"], out / "sft_curves.png", "SFT")
    run.finish({out / "final": model}, dtype=precision.resolve_dtype(cfg.model_dtype, cfg.model), eval_loss=ev)
    return SFTResult(out / "final", ev, run.step, run.skipped, run.elapsed())
