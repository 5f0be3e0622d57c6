"""PPO's passes over a rollout: the rollout packed into one token stream (`rlhf_fast.models.packed`, no padding),
each prompt computed once for its samples (`ppo.share_prompts`), for the frozen passes (policy, reference, value,
reward) and for the update; and the rollout's own log-probs as `old_logp`. Results are `(N, R)` tensors laid out
like `Rollout.labels`, the layout of the losses in `rlhf_fast.ops`. Every function takes the packed batch
`pack_rollout(ro, ...)` when the caller has it (the update packs each minibatch once), else packs `ro` itself.

Reusing the rollout log-probs (`ppo.old_logp: reuse`): the policy has not changed between generation and scoring,
so the engine's log-probs are the behaviour policy's log-probs. They equal a teacher-forced recompute to <= 1e-6
(bitwise with a deterministic engine and `teacher_forced_logprobs(..., deterministic=True)`); `old_logp: check`
recomputes them and reports the max |difference| as `old_logp_max_diff`.

Routing replay (`ppo.moe_routing: replay`, a mixture-of-experts policy): the policy's passes route each token to the
experts the rollout recorded for it (`Rollout.routes`, laid out on the packed stream by `moe.stream_experts`), so a
router that moved, or a top-k tie broken differently by the training forward's rounding, cannot change which experts
a sampled token's log-prob went through. The reference, another model's router, routes by its own. `route_flips`
measures the fraction of tokens whose recomputed top-k differs from the rollout's in some layer (either mode).
"""
from __future__ import annotations

import torch

from rlhf_fast.data import IGNORE_INDEX
from rlhf_fast.models import as_decoder, lora, moe
from rlhf_fast.models.moe import RoutingRecord
from rlhf_fast.models.packed import PackedBatch, pack, packed_hidden
from rlhf_fast.ops.vocab_parallel import head_logprobs
from rlhf_fast.stages import experience as xp


def pack_rollout(ro: xp.Rollout, share_prompts: bool) -> PackedBatch:
    """`ro`'s sequences as one stream, no padding; with `share_prompts` one copy of each prompt (`prompt_index`)."""
    resp_len = (ro.labels != IGNORE_INDEX).sum(1).tolist()
    ids = ro.input_ids.tolist()
    lengths = ro.lengths.tolist()
    prompts = [row[:n - r] for row, n, r in zip(ids, lengths, resp_len)]
    responses = [row[n - r:n] for row, n, r in zip(ids, lengths, resp_len)]
    return pack(prompts, responses, groups=list(ro.prompt_index), share_prompts=share_prompts,
                device=ro.input_ids.device)


def rollout_experts(ro: xp.Rollout, batch: PackedBatch, device=None) -> torch.Tensor | None:
    """The rollout's recorded experts laid out on `batch`'s stream, (M, T, k) int64 (None: no routes)."""
    if ro.routes is None:
        return None
    return moe.stream_experts(batch.samples, batch.num_tokens, list(ro.routes)).to(device)


def routing_for(model, ro: xp.Rollout, batch: PackedBatch, mode: str, *, balance_loss: bool = False):
    """A `RoutingRecord` for one policy forward over `batch`: replaying the rollout's experts (`mode` "replay" and
    the rollout has routes), else recording the router's (for `route_flips`); None for a dense model."""
    lm = as_decoder(model)
    if not lm.routed:
        return None
    experts = rollout_experts(ro, batch, lm.device) if mode == "replay" else None
    if experts is not None:
        return RoutingRecord.replay(experts, balance_loss=balance_loss)
    return RoutingRecord.record(balance_loss=balance_loss)


def route_flips(record, ro: xp.Rollout, batch: PackedBatch) -> float | None:
    """The fraction of tokens (covered by the rollout's record and computed by the forward) whose top-k under the
    forward's router differs from the rollout's in at least one MoE layer (None: no routes, or a dense model)."""
    if record is None or ro.routes is None:
        return None
    if record.replaying:
        return record.flip_fraction(any_layer=True)
    got = record.experts
    if got.numel() == 0:
        return None
    want = rollout_experts(ro, batch, got.device)
    both = (want >= 0).all(-1) & (got >= 0).all(-1)  # (M, T)
    differ = (got.sort(-1).values != want.sort(-1).values).any(-1) & both
    n = int(both.any(0).sum())
    return int(differ.any(0).sum()) / n if n else 0.0


def response_hidden(model, ro: xp.Rollout, batch: PackedBatch | None = None,
                    share_prompts: bool = True, routing=None) -> torch.Tensor:
    """The policy's hidden states that predict each response token, `(N, R, H)`; `routing`: a
    `moe.RoutingRecord` over `batch`'s stream (`routing_for`)."""
    batch = pack_rollout(ro, share_prompts) if batch is None else batch
    rows, pos = batch.predict_reads(ro.labels.shape[1])
    h = packed_hidden(model, batch, rows=rows, routing=routing)  # the prompts' other rows are read by no one
    return h[pos.to(h.device)]


def policy_logprobs(model, ro: xp.Rollout, temperature: float, *, batch: PackedBatch | None = None,
                    entropy: bool = False, routing=None, **support):
    """log pi(y_t | x, y_<t) at `temperature`, `(N, R)` fp32, 0 on padding (with `entropy=True` also the per-token
    entropy); `support`: top_k / top_p / support arguments of the op (`experience.logprob_kwargs`); `routing`: as
    `response_hidden`'s (`batch` must then be given)."""
    hidden = response_hidden(model, ro, batch, routing=routing)  # first: on a sharded model the root's forward gathers the lm_head
    return head_logprobs(hidden, model.lm_head, ro.labels, temperature=temperature, ignore_index=IGNORE_INDEX,
                         return_entropy=entropy, softcap=model.final_logit_softcap, **support)


def values_at(value_model, ro: xp.Rollout, batch: PackedBatch | None = None) -> torch.Tensor:
    """V(x, y_<t) at every response token, `(N, R)`."""
    batch = pack_rollout(ro, True) if batch is None else batch
    return value_model(batch, reads=batch.predict_reads(ro.labels.shape[1]))


def scores(reward_model, ro: xp.Rollout, batch: PackedBatch | None = None) -> torch.Tensor:
    """The reward model's score at each sequence's last token, `(N,)`."""
    batch = pack_rollout(ro, True) if batch is None else batch
    return reward_model(batch, reads=batch.last_reads())


def rollout_logprobs(completions, ro: xp.Rollout) -> torch.Tensor:
    """The generator's log-probs of the sampled tokens, laid out like `ro.labels`: `(N, R)` fp32, 0 on padding."""
    out = torch.zeros(ro.labels.shape, dtype=torch.float32)
    for i, c in enumerate(completions):
        out[i, :len(c.token_ids)] = c.logprobs.float().cpu()
    return out.to(ro.labels.device)


@torch.no_grad()
def score_rollout(cfg, policy, ref, value_model, reward_model, ro: xp.Rollout, completions):
    """The frozen passes for `cfg` (a `PPOConfig`): ((old_logp, ref_logp, old_values, scores), metrics)."""
    mine = xp.logprob_kwargs(cfg.sampling, ro)  # the sampled distribution (top-k / top-p), support replayed
    theirs = xp.logprob_kwargs(cfg.sampling, ro, replay=False)  # the reference's own support
    batch = pack_rollout(ro, cfg.share_prompts)
    metrics = {}
    routing = routing_for(policy, ro, batch, cfg.moe_routing)  # the policy's passes: the rollout's experts
    if cfg.old_logp == "recompute":
        old_logp = policy_logprobs(policy, ro, batch=batch, routing=routing, **mine)
    else:
        old_logp = rollout_logprobs(completions, ro)
        if cfg.old_logp == "check":
            diff = (policy_logprobs(policy, ro, batch=batch, routing=routing, **mine) - old_logp).abs() * ro.mask
            metrics["old_logp_max_diff"] = float(diff.max())
    if cfg.old_logp != "reuse":
        flips = route_flips(routing, ro, batch)
        if flips is not None:
            metrics["moe_route_flip_frac_score"] = flips
    with lora.adapters_disabled(ref):  # LoRA: `ref` is the policy, run as its base (a no-op for a separate model)
        ref_logp = policy_logprobs(ref, ro, batch=batch, **theirs)
    old_values = values_at(value_model, ro, batch) * ro.mask if value_model is not None else \
        torch.zeros_like(ref_logp)  # critic-free
    rm_scores = scores(reward_model, ro, batch) if reward_model is not None else \
        torch.zeros(ro.labels.shape[0], device=ref_logp.device)  # reward_fn alone
    return (old_logp, ref_logp, old_values, rm_scores), metrics


def epoch_order(cfg, prompt_index: list[int], generator: torch.Generator) -> torch.Tensor:
    """The sample order of one PPO epoch. Shared prompts in the update: the prompt groups are shuffled and each
    group's samples stay together, so a minibatch holds whole groups (whenever `minibatch_size` is a multiple of
    `n`) and computes each prompt once; otherwise a uniform permutation."""
    n = len(prompt_index)
    if not cfg.share_prompts:
        return torch.randperm(n, generator=generator)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(prompt_index):
        groups.setdefault(g, []).append(i)
    members = list(groups.values())
    return torch.tensor([i for j in torch.randperm(len(members), generator=generator).tolist() for i in members[j]],
                        dtype=torch.int64)
