"""Generation for TRL's GRPO and RLOO trainers on `rlhf_fast.rollout.RolloutEngine` (part of the TRL plug-in).

Where TRL would call transformers' `generate` (no vLLM, no transformers continuous batching, text prompts), the
mixin below generates with the paged-KV engine on the policy's own parameters instead: the `num_generations`
samples of a prompt share its KV blocks, and each sampled token's log-prob comes with it. TRL's own code still
tokenizes the prompts (chat template, truncation), decodes, scores, logs and trains; only `_generate_single_turn`
and the old-policy log-prob pass change:

  * the sampling arguments are TRL's (`self.generation_config`, which `args.generation_kwargs` overrides):
    temperature, top_k, top_p, `max_completion_length` and the stop tokens (`trainer.eos_token_ids`: the
    tokenizer's EOS and the generation config's). What the engine does not sample (min_p, repetition_penalty != 1,
    greedy decoding, ...) is refused: `generation_backend="rlhf_fast"` raises, "auto" warns once and keeps TRL's
    generate (as for a model family the engine does not cover, multimodal prompts, sharded FSDP / ZeRO-3 models);
  * where TRL recomputes the old policy's log-probs with a forward pass (GRPO: `num_iterations > 1` or
    `steps_per_generation > gradient_accumulation_steps`; RLOO: always), the engine's log-probs are returned
    instead (our PPO's `old_logp=reuse`); they are log-softmax(logits / temperature) at the sampled token, TRL's
    definition, to float32 rounding (README "Rollouts"). With top-k / top-p and our fused GRPO loss, the engine
    returns the cut distribution's log-probs and the loss computes the same cut (`ops.ppo_loss_from_hidden(...,
    top_k=, top_p=)`), so old and new log-probs are of the distribution actually sampled; the reference's
    log-probs (beta != 0) are then its own cut distribution's, as in our PPO.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

BACKENDS = ("auto", "rlhf_fast", "trl")
# GenerationConfig fields that change what is sampled, with the value under which the engine samples the same
_NEUTRAL = {"min_p": (None, 0.0), "repetition_penalty": (None, 1.0), "typical_p": (None, 1.0),
            "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "no_repeat_ngram_size": (None, 0),
            "encoder_repetition_penalty": (None, 1.0), "min_new_tokens": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "num_beams": (None, 1),
            "renormalize_logits": (None, False), "guidance_scale": (None, 1.0), "watermarking_config": (None,)}


def check_peft_adapters(lm: torch.nn.Module) -> None:
    """A ValueError unless every peft LoRA layer of transformers model `lm` is plain LoRA on a decoder projection
    (`nn.Linear` or GPT-2's `Conv1D`), the only kind `models.layers.project` applies to a converted model: not on
    the embeddings or the output head, no DoRA. (A TRL user's adapters are peft's, switched by peft itself.)"""
    from transformers.pytorch_utils import Conv1D

    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    for name, m in lm.named_modules():
        if not (hasattr(m, "lora_A") and hasattr(m, "get_base_layer")):  # peft's LoraLayer
            continue
        base = m.get_base_layer()
        if head in (m, base) or not isinstance(base, (torch.nn.Linear, Conv1D)) or getattr(m, "lora_variant", None):
            raise ValueError(f"{name} ({type(base).__name__}) is not a decoder projection; LoRA applies to the "
                             f"attention and MLP linears only")


def checkpointing(lm: torch.nn.Module) -> bool:
    """Whether transformers model `lm` has its gradient checkpointing on (the padded forward honours it)."""
    if hasattr(lm, "is_activation_checkpointing"):  # transformers >= 5.x (the old name warns)
        return bool(lm.is_activation_checkpointing)
    return bool(getattr(lm, "is_gradient_checkpointing", False))


def unsupported_reason(trainer) -> str | None:
    """Why the engine cannot generate for `trainer` as TRL's generate would (None: it can)."""
    from rlhf_fast.models import covered_families, supports

    if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin
                                   and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3):
        return "a sharded model (FSDP / ZeRO-3)"
    if getattr(trainer, "_is_vlm", False):
        return "a vision-language model"
    base = policy_module(trainer)
    if not supports(base):
        return f"model class {type(base).__name__} (the engine covers {', '.join(covered_families())})"
    try:
        check_peft_adapters(base)
    except ValueError as e:  # naming the adapter the compact model does not apply
        return f"this PEFT adapter ({e})"
    cfg = trainer.generation_config
    if not cfg.do_sample or not cfg.temperature or cfg.temperature <= 0:
        return "greedy decoding (do_sample=False or temperature 0)"
    for name, neutral in _NEUTRAL.items():
        if getattr(cfg, name, None) not in neutral:
            return f"{name}={getattr(cfg, name)!r}"
    return None


def policy_module(trainer):
    """The transformers causal LM the engine binds: a PeftModel's base model, its LoRA layers in place (the
    compact model reads base + adapter unmerged, as our PPO does)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_REQUIRE_GRADS_HOOK = "enable_input_require_grads.<locals>.make_inputs_require_grads"


def drop_stale_require_grads_hooks(model: torch.nn.Module) -> int:
    """Remove the input-embedding hooks transformers has stopped tracking; returns how many.

    transformers' `enable_input_require_grads` registers one forward hook on the input embeddings at every
    `gradient_checkpointing_enable` and replaces `_require_grads_hooks` by the new handle, while
    `gradient_checkpointing_disable` removes them only for PEFT models (transformers 5.x). TRL turns checkpointing off
    and on around every step's log-prob pass, so a plain model gains one hook a step: each forward then calls them
    all, and a compiled decode step sees its embedding's hooks change at every step and recompiles. The hooks are all
    the same `output.requires_grad_(True)`; the one transformers still holds is kept."""
    held = {h.id for h in (getattr(model, "_require_grads_hooks", None) or [])}
    dropped = 0
    for mod in model.modules():
        stale = [k for k, fn in mod._forward_hooks.items()
                 if k not in held and getattr(fn, "__qualname__", "").endswith(_REQUIRE_GRADS_HOOK)]
        for k in stale:  # what RemovableHandle.remove does
            mod._forward_hooks.pop(k, None)
            mod._forward_hooks_with_kwargs.pop(k, None)
            mod._forward_hooks_always_called.pop(k, None)
        dropped += len(stale)
    return dropped


def stop_tokens(trainer) -> tuple[int, ...]:
    """TRL's stop tokens: the tokenizer's EOS and the generation config's (`trainer.eos_token_ids`)."""
    ids = list(trainer.eos_token_ids)
    extra = trainer.generation_config.eos_token_id
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return tuple(dict.fromkeys(int(t) for t in ids if t is not None))


def group(prompt_ids: list[list[int]], n: int) -> tuple[list[list[int]], int]:
    """(distinct prompts, samples each): TRL repeats each prompt `n` times in a row; when the batch is so, one
    request per prompt with n samples (sharing its KV blocks), else one sample per row."""
    if n > 1 and len(prompt_ids) % n == 0:
        heads = prompt_ids[::n]
        if all(prompt_ids[i] == heads[i // n] for i in range(len(prompt_ids))):
            return [list(p) for p in heads], n
    return [list(p) for p in prompt_ids], 1


class EngineGeneration:
    """Mixin for `trl.GRPOTrainer` / `trl.RLOOTrainer` (put first in the bases): generation on RolloutEngine and the
    old log-probs from it. `generation_backend`: "auto" (the engine where it can, TRL's generate with a one-line
    warning elsewhere), "rlhf_fast" (the engine, or raise), "trl" (TRL's generate, unchanged)."""

    def _rf_setup(self, backend: str, cut_logprobs: bool) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"generation_backend must be one of {BACKENDS}, got {backend!r}")
        self._rf_engine = None
        self._rf_pending = None  # the engine's log-probs awaiting TRL's old-policy pass
        self._rf_cut = (0, 1.0)  # the top-k / top-p the last batch's log-probs are of (fused GRPO loss)
        self._rf_cut_logprobs = cut_logprobs
        self.use_rlhf_fast_engine = False
        if backend == "trl" or self.use_vllm or self.use_transformers_continuous_batching:
            if backend == "rlhf_fast":
                raise ValueError("generation_backend='rlhf_fast' with use_vllm / use_transformers_continuous_"
                                 "batching: choose one generator")
            return
        why = unsupported_reason(self)
        if why is not None:
            if backend == "rlhf_fast":
                raise ValueError(f"rlhf_fast's RolloutEngine cannot generate for {why}; use "
                                 f"generation_backend='trl' (TRL's generate)")
            warnings.warn(f"rlhf_fast: TRL's generate for {why} (RolloutEngine does not cover it)", stacklevel=3)
            return
        self.use_rlhf_fast_engine = True

    def _rf_params(self, n: int, cut: bool):
        from rlhf_fast.rollout import SamplingParams

        cfg = self.generation_config
        return SamplingParams(max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                              top_k=int(cfg.top_k or 0), top_p=float(cfg.top_p or 1.0), n=n,
                              stop_token_ids=stop_tokens(self), logprobs="sampled" if cut else "full",
                              seed=int(torch.randint(2**62, ())))

    def _rf_generate(self, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        """TRL's completion token lists (stop token included), in `prompt_ids` order, from the engine; the
        log-probs are kept for `_get_per_token_logps_and_entropies`."""
        from rlhf_fast.models import as_decoder
        from rlhf_fast.rollout import RolloutEngine

        distinct, n = group(prompt_ids, num_generations)
        lm = policy_module(self)
        drop_stale_require_grads_hooks(self.accelerator.unwrap_model(self.model))
        vocab = lm.get_output_embeddings().weight.shape[0]
        probe = self._rf_params(n, cut=False)
        cut = self._rf_cut_logprobs and probe.truncated(vocab) and self._rf_loss_cuts()
        params = dataclasses.replace(probe, logprobs="sampled") if cut else probe
        bs = 16
        blocks = n * sum(-(-(len(p) + params.max_new_tokens) // bs) for p in distinct) + 1  # never preempts
        longest = max(len(p) for p in distinct) + params.max_new_tokens
        eng = self._rf_engine
        if eng is None or eng.lm is not as_decoder(lm) or eng.num_blocks < blocks or eng.max_batch_tokens < longest:
            eng = self._rf_engine = RolloutEngine(lm, block_size=bs, num_blocks=blocks,
                                                  max_batch_tokens=max(4096, longest))
        first = self.accelerator.process_index * len(distinct)  # distinct seeds per process (rows may repeat)
        with torch.no_grad():
            outs = eng.generate(distinct, params, first_index=first)
        self._rf_cut = (params.top_k, params.top_p) if cut else (0, 1.0)
        gen_t, trl_t = params.logprob_temperature, float(self.temperature)
        self._rf_pending = None
        if self._rf_old_logps_needed() and not getattr(self, "tools", None) and gen_t == trl_t:
            self._rf_pending = [(o.token_ids, o.logprobs) for o in outs]
        return [list(o.token_ids) for o in outs]

    def _rf_loss_cuts(self) -> bool:
        """Whether the loss can take the cut distribution's log-probs (our fused GRPO loss; TRL's own takes the
        full softmax). Overridden by the GRPO trainer."""
        return False

    def _rf_old_logps_needed(self) -> bool:
        """Whether TRL's `_generate_and_score_completions` will compute old log-probs with the policy next."""
        return True

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        pending, self._rf_pending = getattr(self, "_rf_pending", None), None
        if pending is not None and model is self.model and not kwargs.get("compute_entropy") \
                and not kwargs.get("compute_aux_loss"):
            old = engine_logps(pending, input_ids, logits_to_keep)
            if old is not None:
                return old, None, None
        top_k, top_p = getattr(self, "_rf_cut", (0, 1.0))
        extra = [v for k, v in kwargs.items() if k not in ("batch_size", "compute_entropy", "compute_aux_loss")]
        if (top_k, top_p) != (0, 1.0) and not args and not kwargs.get("compute_entropy") \
                and not kwargs.get("compute_aux_loss") and all(v is None for v in extra):
            # the reference's (and any recomputed old) log-probs under its own cut of the sampled distribution
            return cut_logps(model, input_ids, attention_mask, logits_to_keep, float(self.temperature), top_k,
                             top_p, kwargs.get("batch_size")), None, None
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                          *args, **kwargs)


@torch.no_grad()
def cut_logps(model, input_ids, attention_mask, logits_to_keep: int, temperature: float, top_k: int, top_p: float,
              batch_size: int | None = None) -> torch.Tensor:
    """(B, logits_to_keep) log-probs of the completion tokens under `model`'s softmax(logits / temperature) cut by
    top-k / top-p (its own support, `ops.token_logprobs`), `batch_size` rows at a time."""
    from rlhf_fast import ops

    out = []
    step = batch_size or input_ids.shape[0]
    for i in range(0, input_ids.shape[0], step):
        ids, att = input_ids[i:i + step], attention_mask[i:i + step]
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=logits_to_keep + 1).logits[:, :-1]
        out.append(ops.token_logprobs(logits.float(), ids[:, -logits_to_keep:], temperature=temperature,
                                      top_k=top_k, top_p=top_p))  # (b, logits_to_keep)
    return torch.cat(out)


def engine_logps(pending, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor | None:
    """The engine's log-probs as TRL's old log-probs (B, logits_to_keep) float32 (0 past each completion), or None
    if the rows are not the engine's completions (then TRL's forward pass computes them)."""
    if len(pending) != input_ids.shape[0]:
        return None
    out = torch.zeros(input_ids.shape[0], logits_to_keep, dtype=torch.float32)
    tail = input_ids[:, input_ids.shape[1] - logits_to_keep:].cpu()  # (B, C) the completions, right-padded
    for i, (ids, lp) in enumerate(pending):
        n = len(ids)
        if n > logits_to_keep or tail[i, :n].tolist() != list(ids):
            return None
        out[i, :n] = lp
    return out.to(input_ids.device)
