"""TRL plug-in: `ops.linear_token_logprobs` behind TRL's fused LM head, GRPO on our fused PPO step, and GRPO / RLOO
generating with our RolloutEngine.

    from rlhf_fast.integrations import trl as rf_trl
    rf_trl.patch()                      # every trainer's `fused_lm_head=True` forward (GRPO, RLOO, DPO, KTO, SFT)
    trainer = rf_trl.GRPOTrainer(...)   # trl.GRPOTrainer: `_compute_loss` is one `ops.ppo_loss_from_hidden`, and
                                        # generation is RolloutEngine where TRL would call transformers' generate
    trainer = rf_trl.RLOOTrainer(...)   # trl.RLOOTrainer generating with RolloutEngine (TRL's loss)

Generation (`_trl_generate.py`): both trainers take `generation_backend="auto" | "rlhf_fast" | "trl"`; the engine's
sampled-token log-probs stand in for TRL's old-policy forward pass. See that module for what is covered.

`patch()` replaces the projection function of `trl.trainer.utils.add_fused_lm_head`'s forward
(`trl.trainer.utils._ChunkedLogProbFunction`, TRL's chunked `hidden @ W.T` log-prob kernel) with ours where we
compute everything asked for: `outputs` within ("log_probs", "entropy") and no `final_logit_softcapping`
(`logit_scale` and the temperature fold into one divisor). Falling back to TRL's own kernel, per call: Gemma-style
softcapping, a non-positive `logit_scale`, and the metric outputs `log_sum_sq_probs`, `mean_logits`, `is_top1`,
which TRL asks for on the policy model of DPO (`mean_logits`, `is_top1`, WPO's `log_sum_sq_probs`), KTO
(`mean_logits`) and SFT (`is_top1`); their reference models and GRPO / RLOO (policy and reference) use ours.
`unpatch()` restores TRL's.

`GRPOTrainer` computes the loss straight from the policy's last hidden states and `lm_head.weight` (the `(B, T, V)`
logits never exist, gradients come out of the forward pass); the hidden states come from our packed forward (no
padding, each group's prompt once; under transformers' gradient checkpointing each block checkpointed as HF
checkpoints each decoder layer; `packed_forward=False` or a distributed wrapper: HF's forward). It covers
`loss_type` grpo / bnpo / dr_grpo / dapo, `epsilon` / `epsilon_high`, `importance_sampling_level` token / sequence,
`beta` (k3 KL to the reference), vLLM's `importance_sampling_ratio` correction and `tool_mask`, with TRL's
normalisers (gradient accumulation included). For anything else it calls TRL's own `_compute_loss`: the loss types
cispo / sapo / vespo / luspo, `delta`, `off_policy_mask_threshold`, `top_entropy_quantile < 1`, an entropy bonus,
`use_bias_correction_kl`, MoE aux losses, multimodal inputs, models with logit scaling or softcapping, and (B, T)
advantages (a subclass's) with `importance_sampling_level="sequence"`. It logs TRL's metrics under TRL's keys and
definitions (`trl_metrics`): `entropy` and `kl` as token means over the completion mask, `clip_ratio/low_mean`,
`high_mean`, `region_mean` (token means, or row means at the sequence level), `clip_ratio/low_min` and `high_max`
(the extreme per-sequence clip fractions over all processes). For loss_type grpo, whose loss weights each sequence
equally, it also logs `entropy/seq_mean` and `kl/seq_mean`: the mean over sequences of each one's token mean, the
weighting the loss gives them. Masked-out positions are selected away (`torch.where`): a NaN/Inf there never reaches
a metric. The metrics read this step's per-token log-probs and entropy from the fused loss itself
(`token_stats=True`: the values its chunks computed, no second lm_head pass); where TRL has no old log-probs (one
iteration per generation: TRL's old policy is this step's, detached) the loss runs on-policy (`old_logp=None`, ratio
exactly 1) instead of computing them.

Supported TRL releases: `SUPPORTED_VERSIONS` (exactly those the tests run against); on any other, `patch()` and
`GRPOTrainer` raise `rlhf_fast.integrations._versions.UnsupportedPeerVersion` naming both, unless
`RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1`.
"""
from __future__ import annotations

import contextlib

import torch

from rlhf_fast import ops
from rlhf_fast.integrations import _versions

SUPPORTED_VERSIONS = ("1.16.0",)  # the TRL releases this plug-in is tested against; any other raises (see _versions)
_OURS = ("log_probs", "entropy")
_original = None


def _logit_transform(model_config) -> tuple[float | None, float | None]:
    """(final_logit_softcapping, logit_scale) of a model config, None where the model has none."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(cfg, name, None) is not None:
            scale = getattr(cfg, name)
    return getattr(cfg, "final_logit_softcapping", None), scale


class LinearLogprobFunction:
    """Stands in for TRL's `ChunkedLogProbFunction`: `apply(hidden (N, H), weight (V, H), bias (V,) | None,
    targets (N,), temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)` ->
    (log_probs (N,) fp32, entropy (N,) fp32 | None, None, None, None), or TRL's own result for what we do not
    compute (see the module docstring)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        if final_logit_softcapping is not None or not logit_scale > 0 or not set(outputs) <= set(_OURS):
            return _original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                   logit_scale, outputs)
        dev = hidden.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        with torch.autocast(dev, enabled=False):
            logp, ent = ops.linear_token_logprobs(hidden.to(cd), weight.to(cd), targets,
                                                  bias=None if bias is None else bias.to(cd),
                                                  temperature=float(temperature) / float(logit_scale),
                                                  return_entropy=True)
        return logp, (ent.float() if "entropy" in outputs else None), None, None, None


def check_version() -> str:
    """The installed TRL version; `_versions.UnsupportedPeerVersion` unless it is in SUPPORTED_VERSIONS."""
    import trl  # noqa: F401  (its __version__)

    return _versions.check("trl", SUPPORTED_VERSIONS)


def patch() -> None:
    """Put `ops.linear_token_logprobs` behind TRL's fused LM head (idempotent; `unpatch()` undoes it)."""
    global _original
    check_version()
    from trl.trainer import utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is not LinearLogprobFunction:
        _original = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = LinearLogprobFunction


def unpatch() -> None:
    global _original
    from trl.trainer import utils as trl_utils

    if _original is not None:
        trl_utils._ChunkedLogProbFunction, _original = _original, None


# --- GRPOTrainer on the fused step ---------------------------------------------------------------------------------

_AGG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def fallback_reason(trainer, inputs) -> str | None:
    """Why `GRPOTrainer._compute_loss` would call TRL's own code for these inputs (None: ours runs)."""
    args = trainer.args
    if trainer.loss_type not in _AGG_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    checks = [(getattr(args, "delta", None) is not None, "delta (two-sided clipping)"),
              (trainer.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
              (trainer.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
              (trainer._entropy_bonus_enabled, "an entropy bonus"),
              (trainer.beta != 0.0 and getattr(args, "use_bias_correction_kl", False), "use_bias_correction_kl"),
              (trainer.aux_loss_enabled, "a MoE aux loss"),
              (any(inputs.get(k) is not None for k in _MULTIMODAL), "multimodal inputs"),
              (trainer.importance_sampling_level not in ("token", "sequence"), "importance_sampling_level"),
              # TRL differentiates the sequence mean: GSPO's stop-gradient form has its gradient only for an
              # advantage constant over each sequence (TRL's own (B,); a subclass may give (B, T))
              (trainer.importance_sampling_level == "sequence" and inputs["advantages"].dim() == 2,
               "per-token advantages with importance_sampling_level='sequence'")]
    for bad, why in checks:
        if bad:
            return why
    softcap, scale = _logit_transform(trainer.accelerator.unwrap_model(trainer.model).config)
    if softcap is not None or scale not in (None, 1, 1.0):
        return "logit softcapping / scaling"
    return None


def _agg(trainer, mode: str, mask: torch.Tensor, inputs) -> ops.PPOAgg:
    """TRL's per-loss_type normaliser (gradient accumulation folded in) as a PPOAgg over the (B, T) mask."""
    accum = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    b = mask.shape[0]
    if trainer.loss_type == "grpo":
        return ops.PPOAgg("seq-mean-token-mean", num_seqs=b * accum)
    if trainer.loss_type == "bnpo":
        return ops.PPOAgg("token-mean", num_tokens=mask.sum().clamp(min=1.0) * accum)
    if trainer.loss_type == "dr_grpo":
        return ops.PPOAgg("seq-mean-token-sum-norm", norm=b * trainer.max_completion_length * accum)
    n = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes  # dapo
    if mode == "train":
        n = n * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return ops.PPOAgg("token-mean", num_tokens=n)


class _Recomputed(torch.nn.Module):
    """A decoder block whose activations are recomputed in the backward (torch's non-reentrant checkpoint): what
    transformers' gradient checkpointing does to each decoder layer, so the memory kept is the same, each block's
    input."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def recomputed_blocks(decoder):
    """Within the block, every block of our `decoder` (a `DecoderLM`) is checkpointed: the user's
    `gradient_checkpointing` (transformers' flag, on the HF model our decoder shares its modules with) honoured by
    the packed forward. The blocks are put back on exit; the backward's recompute calls them directly."""
    blocks = list(decoder.layers)
    try:
        for i, block in enumerate(blocks):
            decoder.layers[i] = _Recomputed(block)
        yield decoder
    finally:
        for i, block in enumerate(blocks):
            decoder.layers[i] = block


def packed_completion_hidden(trainer, model, inputs) -> torch.Tensor | None:
    """The policy's final hidden states that predict each completion token, (B, C, H), from our packed forward
    (`rlhf_fast.models.packed`: no padding, each group's shared prompt computed once, PEFT adapters applied
    unmerged), or None where it does not apply: a model wrapped for distribution (DDP / FSDP / DeepSpeed run their
    hooks in the module's own forward), an architecture the compact models do not cover, or
    `trainer.packed_forward` off (then the padded HF forward runs). With transformers' gradient checkpointing on (HF's
    flag; TRL's default) and the model training, each decoder block is checkpointed as HF's forward would
    checkpoint each decoder layer: the same activations kept (each block's input), recomputed in the backward."""
    from rlhf_fast.integrations._trl_generate import check_peft_adapters, checkpointing
    from rlhf_fast.models import as_decoder, supports
    from rlhf_fast.models.packed import pack, packed_hidden

    if not getattr(trainer, "packed_forward", False) or trainer.accelerator.unwrap_model(model) is not model:
        return None
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports(lm):
        return None
    try:
        check_peft_adapters(lm)
    except ValueError:  # an adapter the compact model does not apply
        return None
    prompt_mask, completion_mask = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
    prompts = [row[m].tolist() for row, m in zip(inputs["prompt_ids"], prompt_mask)]
    responses = [row[:int(n)].tolist() for row, n in zip(inputs["completion_ids"], completion_mask.sum(1))]
    groups = {}
    batch = pack(prompts, responses, groups=[groups.setdefault(tuple(p), len(groups)) for p in prompts],
                 share_prompts=True, device=inputs["prompt_ids"].device)
    rows, pos = batch.predict_reads(inputs["completion_ids"].shape[1])
    decoder = as_decoder(lm)  # shares lm's modules (converted once)
    recompute = checkpointing(lm) and lm.training and torch.is_grad_enabled()
    with trainer.accelerator.autocast(), (recomputed_blocks(decoder) if recompute else contextlib.nullcontext()):
        h = packed_hidden(decoder, batch, rows=rows)  # (R, H): the read rows only
    return h[pos]  # (B, C, H)


def fused_grpo_loss(trainer, model, inputs) -> torch.Tensor:
    """TRL GRPO's `_compute_loss` as one `ops.ppo_loss_from_hidden` call (for the cases `fallback_reason` passes)."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    p, c = prompt_ids.shape[1], completion_ids.shape[1]
    hidden = packed_completion_hidden(trainer, model, inputs)
    if hidden is None:  # the padded Hugging Face forward
        with trainer.accelerator.autocast():
            out = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                        attention_mask=torch.cat([prompt_mask, completion_mask], 1),
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1][:, p - 1:p + c - 1]  # (B, C, H): the positions that predict the completion
    lm_head = trainer.accelerator.unwrap_model(model).get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if trainer.args.cast_lm_head_to_fp32 or hidden.dtype != weight.dtype:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    top_k, top_p = getattr(trainer, "_rf_cut", (0, 1.0))  # the engine's cut, when its log-probs are of it
    old = inputs.get("old_per_token_logps")  # None: TRL's old policy is this step's (ratio 1): on-policy
    mode = "train" if trainer.model.training else "eval"
    is_w = None
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        is_w = inputs["importance_sampling_ratio"].expand_as(mask).to(torch.float32)
    kl = None
    if trainer.beta != 0.0:
        kl = ops.KLTerm(inputs["ref_per_token_logps"], coef=float(trainer.beta), kind="k3")
    agg = _agg(trainer, mode, mask, inputs)
    clip = ops.PPOClip(low=trainer.epsilon_low, high=trainer.epsilon_high, level=trainer.importance_sampling_level)
    loss, st = ops.ppo_loss_from_hidden(hidden, weight, completion_ids, old, inputs["advantages"], mask, bias=bias,
                                        clip=clip, agg=agg, kl=kl, temperature=trainer.temperature,
                                        top_k=top_k, top_p=top_p, is_weights=is_w, token_stats=True)
    # the metrics: this step's log-probs and entropy as the loss computed them (no second lm_head pass), unless the
    # loss dropped a masked-in token for a NaN/Inf input (then TRL's metrics still see it: computed apart)
    logp, entropy = st.token_logp, st.token_entropy
    if int(st.nonfinite):
        with torch.no_grad():
            labels = completion_ids.masked_fill(mask == 0, -100)  # masked-out rows skip the lm_head (0 there)
            logp, entropy = ops.linear_token_logprobs(hidden.detach(), weight.detach(), labels,
                                                      bias=None if bias is None else bias.detach(),
                                                      temperature=trainer.temperature, top_k=top_k, top_p=top_p,
                                                      return_entropy=True)
    if old is None:
        old = logp
    ref = None if kl is None else inputs["ref_per_token_logps"]
    for key, value in trl_metrics(trainer, mask, logp, entropy.float(), old, inputs["advantages"], ref).items():
        trainer._metrics[mode][key].append(value)
    return loss


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """TRL's `nanmin` / `nanmax` of a 1-D tensor: NaNs ignored, NaN if all are NaN."""
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return torch.tensor(float("nan"))
    return x.max() if largest else x.min()


@torch.no_grad()
def trl_metrics(trainer, mask, logp, entropy, old, advantages, ref=None) -> dict[str, float]:
    """TRL 1.16 GRPO's logged metrics by its definitions (`GRPOTrainer._compute_loss`), gathered as TRL gathers them,
    plus `entropy/seq_mean` and `kl/seq_mean` for loss_type grpo.

    mask, logp (this step's), entropy, old (old log-probs): (B, T); advantages (B,) or (B, T); ref: (B, T)
    reference log-probs, or None without a KL term. `kl` is TRL's k3 exp(ref - logp) - (ref - logp) - 1 (unclamped).
    Token means are global: sum and count are summed over processes before dividing. Masked-out positions are
    selected away with `torch.where`, so a NaN/Inf there gives no NaN.
    """
    acc = trainer.accelerator
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    adv = (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)).float()  # (B, 1) or (B, T)

    def global_masked_mean(x):  # a (B, 1) x: over the rows; a (B, T) x: over the mask
        if x.shape[1] == 1:
            local = torch.stack([x.float().sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([torch.where(m, x.float(), zero).sum(), m.sum().float()])
        totals = acc.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def masked_seq_mean(x):  # (B,): each row's mean over its mask (NaN for an empty row, as TRL's)
        if x.shape[1] == 1:
            return x.squeeze(1).float()
        return torch.where(m, x.float(), zero).sum(-1) / m.sum(-1)

    def seq_mean(x):  # the mean over non-empty rows of each row's token mean, over all processes
        rows = m.any(-1)
        row_means = torch.where(rows, masked_seq_mean(x), zero)
        totals = acc.reduce(torch.stack([row_means.sum(), rows.sum().float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    out = {}
    per_token_kl = None
    if ref is not None:
        d = torch.where(m, ref - logp, zero)
        per_token_kl = torch.expm1(d) - d
        out["kl"] = global_masked_mean(per_token_kl)
    out["entropy"] = global_masked_mean(entropy)
    log_ratio = torch.where(m, logp - old, zero)  # (B, T)
    if trainer.importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    coef = log_ratio.exp()
    low = (coef < 1 - trainer.epsilon_low) & (adv < 0)
    high = (coef > 1 + trainer.epsilon_high) & (adv > 0)
    out["clip_ratio/low_mean"] = global_masked_mean(low)
    out["clip_ratio/high_mean"] = global_masked_mean(high)
    out["clip_ratio/region_mean"] = global_masked_mean(low | high)
    out["clip_ratio/low_min"] = _nan_extreme(acc.gather(masked_seq_mean(low)), largest=False).item()
    out["clip_ratio/high_max"] = _nan_extreme(acc.gather(masked_seq_mean(high)), largest=True).item()
    if trainer.loss_type == "grpo":  # the loss weights sequences equally: these are its entropy and KL
        out["entropy/seq_mean"] = seq_mean(entropy)
        if per_token_kl is not None:
            out["kl/seq_mean"] = seq_mean(per_token_kl)
    return out


def _make_trainer(name: str):
    check_version()
    import trl

    from rlhf_fast.integrations._trl_generate import EngineGeneration

    class GRPOTrainer(EngineGeneration, trl.GRPOTrainer):
        """`trl.GRPOTrainer` whose loss is `ops.ppo_loss_from_hidden` and whose generation is RolloutEngine (see
        rlhf_fast.integrations.trl). `generation_backend`: "auto" | "rlhf_fast" | "trl" (TRL's generate)."""

        def __init__(self, *args, generation_backend: str = "auto", packed_forward: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.packed_forward = packed_forward  # the loss's forward: ours, packed (False: HF's, padded)
            self._rf_setup(generation_backend, cut_logprobs=True)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if not self.use_rlhf_fast_engine or images is not None or multimodal_fields:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            return self._rf_generate(prompt_ids, num_generations), None

        def _rf_loss_cuts(self):
            return fallback_reason(self, {"advantages": torch.zeros(1)}) is None

        def _rf_old_logps_needed(self):  # TRL's condition (its vLLM case never reaches the engine)
            every = self.args.steps_per_generation * self.num_iterations
            return self.args.gradient_accumulation_steps % every != 0

        def _compute_loss(self, model, inputs):
            if fallback_reason(self, inputs) is not None:
                return super()._compute_loss(model, inputs)
            return fused_grpo_loss(self, model, inputs)

    class RLOOTrainer(EngineGeneration, trl.RLOOTrainer):
        """`trl.RLOOTrainer` whose generation is RolloutEngine and whose old log-probs are the engine's (TRL's
        loss). `generation_backend`: "auto" | "rlhf_fast" | "trl" (TRL's generate)."""

        def __init__(self, *args, generation_backend: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self._rf_setup(generation_backend, cut_logprobs=False)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            if not self.use_rlhf_fast_engine or images is not None or multimodal_fields:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            n = self.num_generations if self.model.training else self.num_generations_eval
            return self._rf_generate(prompt_ids, n)

    cls = {"GRPOTrainer": GRPOTrainer, "RLOOTrainer": RLOOTrainer}[name]
    cls.__module__ = __name__
    return cls


def __getattr__(name):
    # trl is imported only when a trainer class is first asked for
    if name in ("GRPOTrainer", "RLOOTrainer"):
        cls = _make_trainer(name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
