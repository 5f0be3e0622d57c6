"""PPO against a frozen reward model with a KL penalty to the frozen SFT policy (InstructGPT, sec. 3.5).

One iteration: sample `sampling.n` completions for each of `prompts_per_iter` prompts with the rollout engine on
the policy's live weights; score them (policy, reference, value and reward passes); per-token rewards
`score - beta * KL`, GAE and whitened advantages; then `ppo_epochs` passes of minibatch updates of the clipped
policy loss - `entropy_coef` * entropy (the fused PPO step, `ops.ppo_loss_from_hidden`) + `vf_coef` * clipped value
loss (+ `ptx_coef` * pretraining NLL), one backward per minibatch. All loss math is in `rlhf_fast.ops`.

`ppo.algorithm` picks the advantage estimator and loss defaults (`rlhf_fast.stages.algorithms`): the critic-free
ones (grpo, dr_grpo, dapo, rloo, reinforce_pp, ...) load no value model and use the `sampling.n` completions of a
prompt as its group. `ppo.reward_fn` scores completions with a function instead of (or on top of) the RM.

Under torchrun with `ppo.parallel.tp` = T the world is dp x T (`distributed.use_tp`): every model is split over its
tp group (`parallelize.tensor_parallel`, the value and reward models' backbones, their scalar heads whole) and FSDP2
sharded over dp; a tp group generates, scores and trains on one dp rank's part of each global batch. The passes and
the update read each rank's lm_head rows (`ops.vocab_parallel`: no (tokens, V) logits gathered for the loss, the
entropy or the KL); the engine gathers only the sampled rows' logits (`rollout.tp`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf_fast import distributed, ops, parallelize, precision, preflight
from rlhf_fast.chat import Codec
from rlhf_fast.config import ConfigError, PPOConfig, to_dict
from rlhf_fast.data import SFTExample, epoch_batches, load_texts
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import as_decoder, disable_dropout, load_model, lora
from rlhf_fast.models.loading import load_tokenizer
from rlhf_fast.ops.vocab_parallel import head_ppo_loss
from rlhf_fast.rollout import SamplingParams
from rlhf_fast.stages import algorithms
from rlhf_fast.stages import experience as xp
from rlhf_fast.stages import packed_passes as pp
from rlhf_fast.stages import reward_fn as rfn
from rlhf_fast.stages.common import guarded_step, make_optimizer, make_scheduler, prepare, resolve_device
from rlhf_fast.stages.kl_control import KLController
from rlhf_fast.stages.run_state import TrainRun, exclusive, record_truncation
from rlhf_fast.stages.sft import response_nll
from rlhf_fast.truncation import context_length, fit_len, warn_prompts_cut

log = logging.getLogger(__name__)


class PPOResult(NamedTuple):
    policy_dir: Path
    value_dir: Path | None  # None for a critic-free algorithm
    iterations: int
    skipped_steps: int
    elapsed_s: float  # training time, summed over resumed runs


def load_frozen_pair(policy_dir: str | Path, rm_dir: str | Path):
    """The frozen reference (SFT) policy and reward model (None for a dir ""), in eval mode without gradients."""
    ref = load_model(policy_dir, "ppo.policy").eval().requires_grad_(False) if policy_dir else None
    rm = ScalarHeadModel.from_pretrained(rm_dir).eval().requires_grad_(False) if rm_dir else None
    return ref, rm




class PPOTrainer:
    """The models, optimiser and state of one PPO run; `iteration(k)` runs one rollout + update round."""

    def __init__(self, cfg: PPOConfig, policy, value, ref, reward_model, tokenizer, ptx: list[list[int]] = (),
                 reward_fn: rfn.RewardFn | None = None):
        """`value` is None for a critic-free `cfg.algorithm`, `reward_model` None when `reward_fn` alone scores. The
        policy and reference are rlhf_fast models; a transformers causal LM is converted (`models.as_decoder`,
        sharing its modules)."""
        policy, ref = as_decoder(policy), None if ref is None else as_decoder(ref)
        self.cfg, self.policy, self.value, self.ref, self.rm = cfg, policy, value, ref, reward_model
        self.algo, self.reward_fn, self.tokenizer = algorithms.get(cfg.algorithm), reward_fn, tokenizer
        if self.algo.critic != (value is not None):
            need = "needs a" if self.algo.critic else "takes no"
            raise ValueError(f"ppo.algorithm={cfg.algorithm!r} {need} value model")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = Codec(tokenizer).stop_ids  # eos and the chat template's end of turn
        self.ptx = list(ptx)
        if not cfg.dropout:  # train-mode forwards equal the eval-mode rollout scoring: ratio 1 on-policy
            for m in (policy, value, ref, reward_model):
                if m is not None:
                    disable_dropout(m)
        self.groups = [[p for p in policy.parameters() if p.requires_grad]]
        if value is not None:
            self.groups.append(value.trainable_parameters())
        self.opt = make_optimizer([p for g in self.groups for p in g], cfg.optim)
        self.sched = make_scheduler(self.opt, cfg.optim, cfg.iterations)
        self.kl_ctl = KLController(cfg.kl)
        from rlhf_fast.rollout import RolloutEngine

        self.generator = RolloutEngine(policy, compile=cfg.compile_rollout)
        self.skipped = 0
        if precision.autocast_on(cfg.mixed_precision, policy.device) and cfg.old_logp == "reuse":
            log.warning("ppo: mixed_precision runs the update in bf16 while old_logp=reuse takes the rollout's fp32 "
                        "log-probs, so the ratio at unchanged weights is 1 only up to bf16 rounding; set "
                        "old_logp=recompute for an exact start")

    def sampling(self, iteration: int) -> SamplingParams:
        return self.cfg.sampling.params(seed=self.cfg.seed * 100_003 + iteration, stop_token_ids=self.stop_ids)

    def collect(self, prompts: list[list[int]], iteration: int,
                texts: list | None = None) -> tuple[xp.Experience, dict]:
        """Rollouts, frozen passes and advantages; returns the experience and per-phase seconds. `texts`: the
        prompts as written (string or messages, `PromptExample.raw`) for `reward_fn` (default: decoded from the
        ids)."""
        c, t0 = self.cfg, time.perf_counter()
        self.policy.eval()
        mine = distributed.rank_slice(len(prompts))  # this rank's prompts; seeds follow the global index
        with parallelize.unsharded(self.policy):  # no collective while decoding
            comps = self.generator.generate(prompts[mine], self.sampling(iteration),
                                            **({"first_index": mine.start} if mine.start else {}))
        comps = [cp._replace(prompt_index=cp.prompt_index + mine.start) for cp in comps]
        t1 = time.perf_counter()
        ro = xp.make_rollout(prompts, comps, self.pad_id, self.policy.device)
        with parallelize.unsharded(self.policy, self.ref, self.value, self.rm):  # no-op in one process
            with precision.autocast(c.mixed_precision, self.policy.device):  # as the update
                (old_logp, ref_logp, old_values, scores), checks = pp.score_rollout(c, self.policy, self.ref,
                                                                                    self.value, self.rm, ro, comps)
        if self.reward_fn is not None:
            texts = texts or [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
            answers = [self.tokenizer.decode(x.token_ids, skip_special_tokens=True) for x in comps]
            scores = scores + rfn.score(self.reward_fn, c.reward_fn, [texts[x.prompt_index] for x in comps],
                                        answers).to(scores.device)
        roll = pp.rollout_logprobs(comps, ro) if c.old_logp != "reuse" else None  # the generator's, beside old_logp
        ro, (old_logp, ref_logp, old_values, roll, scores) = xp.gather_scored(  # the global batch on every rank
            prompts, comps, ro, (old_logp, ref_logp, old_values, roll, scores), self.pad_id)
        checks = {k: distributed.all_max(v) for k, v in checks.items()}
        if roll is not None:  # rollout vs trainer, over the global batch (the same on every rank)
            checks.update(rollout_stats(old_logp, roll, ro.mask, c.rollout_correction.op()))
        t2 = time.perf_counter()
        kl_coef = self.kl_ctl.value if c.kl.placement == "reward" else 0.0
        if self.algo.critic:
            exp = xp.advantages(ro, old_logp, ref_logp, old_values, scores, kl_coef=kl_coef, kl_kind=c.kl.kind,
                                gamma=c.gamma, lam=c.lam)
        else:
            adv, keep = algorithms.critic_free_advantages(self.algo, scores, old_logp, ref_logp, ro.mask,
                                                          ro.prompt_index, kl_coef=kl_coef, kl_kind=c.kl.kind,
                                                          gamma=c.gamma)
            kl = ((old_logp - ref_logp) * ro.mask).sum(1)
            exp = xp.Experience(ro, old_logp, ref_logp, old_values, scores, adv, adv, kl, keep)
        exp = exp._replace(rollout_logp=roll)
        t3 = time.perf_counter()
        return exp, {"time_generate": t1 - t0, "time_score": t2 - t1, "time_advantages": t3 - t2,
                     "generated_tokens": float(ro.mask.sum()), **checks}

    def minibatch_loss(self, mb: xp.Experience, ptx_ids: list[list[int]], *, glob: GlobalCounts | None = None,
                       ptx_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss - entropy bonus (+ KL in loss) through the fused PPO step, + vf_coef * clipped
        value loss (+ ptx_coef * pretraining NLL): one scalar, one backward. `glob` / `ptx_tokens`: the global
        minibatch's counts when `mb` / `ptx_ids` are one rank's part of it (None: their own)."""
        c, ro = self.cfg, mb.rollout
        batch = pp.pack_rollout(ro, c.share_prompts)
        loss, stats = self.policy_loss(mb, batch, glob=glob)
        if self.value is not None:
            vpred = pp.values_at(self.value, ro, batch)
            vl, vst = ops.value_loss(vpred, mb.old_values, mb.returns, ro.mask,
                                     clip=c.value_clip, agg=_token_mean(None if glob is None else glob.tokens))
            loss = loss + c.vf_coef * vl
            stats.update(vf_loss=float(vl.detach()), vf_explained_var=float(vst.explained_variance))
            if glob is not None:  # a part of a minibatch: the sums the global explained variance needs
                stats.update(_explained_var_sums(vpred.detach(), mb.returns, ro.mask))
        if ptx_ids:
            nll, n = response_nll(self.policy, [SFTExample(t, 0) for t in ptx_ids])
            ptx_loss = nll / (max(n, 1) if ptx_tokens is None else ptx_tokens)
            loss = loss + c.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        return loss, stats

    def policy_loss(self, mb: xp.Experience, batch=None, *,
                    glob: GlobalCounts | None = None) -> tuple[torch.Tensor, dict]:
        """`ops.ppo_loss_from_hidden` on the response hidden states and the lm_head (weight and bias), or under tensor
        parallelism its vocab-parallel form on this rank's rows (`ops.vocab_parallel.head_ppo_loss`); `batch`: the
        minibatch packed (`packed_passes.pack_rollout`; None: packed here)."""
        c, ro = self.cfg, mb.rollout
        kl_coef = self.kl_ctl.value if c.kl.placement == "loss" else 0.0
        batch = pp.pack_rollout(ro, c.share_prompts) if batch is None else batch
        aux = c.router_aux_coef > 0
        routing = pp.routing_for(self.policy, ro, batch, c.moe_routing, balance_loss=aux)  # MoE: rollout's experts
        hidden = pp.response_hidden(self.policy, ro, batch, routing=routing)  # (n, R, H)
        loss, st = head_ppo_loss(  # the lm_head read after the root's forward; split over the vocabulary under tp
            hidden, self.policy.lm_head, ro.labels.clamp(min=0), mb.old_logp, mb.advantages, ro.mask,
            clip=ops.PPOClip(low=c.clip, high=c.clip_high or self.algo.clip_high),
            agg=_policy_agg(c.loss_agg or self.algo.loss_agg, ro.mask.shape[0], c.sampling.max_new_tokens, glob),
            kl=ops.KLTerm(mb.ref_logp, kl_coef, c.kl.kind) if kl_coef > 0 else None,
            entropy_coef=c.entropy_coef, softcap=self.policy.final_logit_softcap, **xp.logprob_kwargs(c.sampling, ro),
            **self.correction(mb))
        pg, entropy, clip_frac, approx_kl = st.policy_loss, st.entropy, st.clip_frac, st.approx_kl
        stats = {"pg_loss": float(pg.detach()), "entropy": float(entropy.detach()),
                 "clip_frac": float(clip_frac), "approx_kl": float(approx_kl)}
        flips = pp.route_flips(routing, ro, batch)
        if flips is not None:  # tokens whose recomputed top-k differs from the rollout's (any MoE layer)
            stats["moe_route_flip_frac"] = flips
        if aux and routing is not None:
            balance = routing.balance_loss().to(loss.device)
            loss = loss + c.router_aux_coef * balance
            stats["router_aux_loss"] = float(balance.detach())
        return loss, stats

    def correction(self, mb: xp.Experience) -> dict:
        """The fused step's rollout-correction arguments (`ppo.rollout_correction`; none unless old_logp is
        recomputed and a mode is set)."""
        corr = self.cfg.rollout_correction
        if mb.rollout_logp is None or corr.mode == "none":
            return {}
        return {"rollout_logp": mb.rollout_logp, "rollout_correction": corr.op()}

    def minibatch_step(self, exp: xp.Experience, idx: torch.Tensor, ptx_ids: list[list[int]]):
        """This rank's part of global minibatch `idx` (and of `ptx_ids`) through `minibatch_loss`, micro-batched
        and backpropagated (`distributed.accumulate`); the losses use the global minibatch's token counts, and the
        returned stats are global. Returns the detached loss (already backpropagated) and the stats."""
        if distributed.world_size() == 1 and distributed.num_micro(len(idx), self.cfg.parallel.micro_batch_size) == 1:
            loss, stats = self.minibatch_loss(exp.select(idx), ptx_ids)  # its own counts are the global ones
            loss.backward()
            return loss.detach(), stats
        m = exp.rollout.mask[idx.to(exp.rollout.mask.device)]  # (B, R) the global minibatch's
        glob = GlobalCounts(int(m.sum()), int((m.sum(1) > 0).sum()), len(idx))
        ptx_part, ptx_tokens = ptx_ids[distributed.rank_slice(len(ptx_ids))], None
        if ptx_ids:
            ptx_tokens = sum(len(t) - 1 for t in ptx_ids)  # sft_batch labels every token after the first
            ptx_tokens = torch.tensor(max(ptx_tokens, 1))
        parts: list[tuple[dict, float]] = []

        def loss_of(items, real):
            mb = exp.select(idx[list(items)])
            ptx = ptx_part if not parts and real else []  # this rank's ptx texts ride on its first micro-batch
            loss, stats = self.minibatch_loss(mb, ptx, glob=glob, ptx_tokens=ptx_tokens)
            parts.append((stats, float(mb.rollout.mask.sum())) if real else ({k: 0.0 for k in stats}, 0.0))
            return loss

        loss = distributed.accumulate(range(len(idx)), loss_of, self.cfg.parallel.micro_batch_size)
        stats = distributed.reduce_stats(parts, sums=("pg_loss", "entropy", "vf_loss", "ptx_loss", *EV_SUMS))
        if "ev_n" in stats:
            n, r, r2, d, d2 = (stats.pop(k) for k in EV_SUMS)
            var_r, var_d = r2 - r * r / max(n, 1), d2 - d * d / max(n, 1)
            stats["vf_explained_var"] = 1 - var_d / var_r if var_r > 0 else 0.0
        return loss, stats

    def update(self, exp: xp.Experience, iteration: int) -> dict:
        """`ppo_epochs` x minibatches of guarded optimiser steps (early stop on approx KL when configured)."""
        c = self.cfg
        self.policy.train()
        if self.value is not None:
            self.value.train()
        g = torch.Generator().manual_seed(c.seed * 7919 + iteration)
        train = exp.train.cpu()  # (N,) bool: all rows but those of DAPO's zero-std groups
        n = int(train.sum())
        agg: dict[str, list[float]] = {"train_rows": [float(n)]}
        stop = False
        for _ in range(c.ppo_epochs if n else 0):
            perm = pp.epoch_order(c, exp.rollout.prompt_index, g)
            perm = perm[train[perm]]
            for start in range(0, n, c.minibatch_size):
                idx = perm[start:start + c.minibatch_size]  # the global minibatch: the same on every rank
                ptx_ids = []
                if self.ptx and c.ptx_coef > 0:
                    pick = torch.randint(len(self.ptx), (c.minibatch_size,), generator=g).tolist()
                    ptx_ids = [self.ptx[i] for i in pick]
                with precision.autocast(c.mixed_precision, self.policy.device):
                    loss, stats = self.minibatch_step(exp, idx, ptx_ids)
                res = guarded_step(loss, self.groups, self.opt, None, c.optim.grad_clip)  # lr moves per iteration
                if not res.applied:
                    self.skipped += 1
                    log.warning("ppo: iteration %d: step skipped (non-finite loss or gradient)", iteration)
                for k, v in {**stats, "grad_norm": res.grad_norm}.items():
                    agg.setdefault(k, []).append(v)
                if c.early_stop_kl > 0 and stats["approx_kl"] > c.early_stop_kl:
                    stop = True
                    break
            if stop:
                break
        self.sched.step()
        out = {k: sum(v) / len(v) for k, v in agg.items()}
        out["early_stopped"] = float(stop)
        return out

    def iteration(self, prompts: list[list[int]], iteration: int, texts: list | None = None) -> dict:
        exp, metrics = self.collect(prompts, iteration, texts)
        t0 = time.perf_counter()
        metrics.update(self.update(exp, iteration))
        metrics["time_update"] = time.perf_counter() - t0
        mean_kl = float(exp.kl.mean())
        self.kl_ctl.update(mean_kl, exp.scores.shape[0])
        metrics.update(score=float(exp.scores.mean()), kl=mean_kl, kl_coef=self.kl_ctl.value,
                       response_len=float(exp.rollout.mask.sum(1).mean()), lr=self.sched.get_last_lr()[0],
                       skipped=float(self.skipped))
        return metrics


EV_SUMS = ("ev_n", "ev_r", "ev_r2", "ev_d", "ev_d2")


def _explained_var_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Count, sum and sum of squares of the returns R and the residuals R - v over valid tokens, float64: summed
    over ranks they give the global 1 - Var[R - v] / Var[R]."""
    m = mask.double()
    r, d = returns.double() * m, (returns.double() - values.double()) * m
    return dict(zip(EV_SUMS, (float(m.sum()), float(r.sum()), float((r * r).sum()), float(d.sum()),
                              float((d * d).sum()))))


class GlobalCounts(NamedTuple):
    """The normalisers of a global minibatch that each rank computes a part of."""

    tokens: int  # valid response tokens
    seqs: int  # rows with at least one valid token
    rows: int


def _policy_agg(mode: str, rows: int, max_new_tokens: int, glob: GlobalCounts | None) -> ops.PPOAgg:
    """The algorithm's policy-loss aggregation (`algorithms.loss_agg`), over the global minibatch when `glob` is
    given: token-mean divides by its tokens, seq-* modes by its sequences, Dr. GRPO's constant by its rows."""
    if glob is None:
        return algorithms.loss_agg(mode, rows, max_new_tokens)
    agg = algorithms.loss_agg(mode, glob.rows, max_new_tokens)
    if agg.mode == "token-mean" and agg.num_tokens is None:
        return ops.PPOAgg("token-mean", num_tokens=glob.tokens)
    if agg.mode.startswith("seq"):
        return ops.PPOAgg(agg.mode, num_seqs=glob.seqs)
    return agg


def _token_mean(num_tokens: int | None):
    """Token-mean aggregation, over `num_tokens` (a global minibatch's count) when given."""
    return "token-mean" if num_tokens is None else ops.PPOAgg("token-mean", num_tokens=num_tokens)


def _check_world(cfg: PPOConfig) -> None:
    """On N data-parallel ranks (the world over parallel.tp) every rank needs sequences in every minibatch, and
    generation must run collective-free."""
    distributed.use_tp(cfg.parallel.tp)  # the dp x tp layout (DistributedError when tp does not divide the world)
    w = distributed.dp_size()
    if w == 1:
        return
    n = cfg.prompts_per_iter * cfg.sampling.n
    last = n % cfg.minibatch_size
    if cfg.prompts_per_iter < w or cfg.minibatch_size < w or 0 < last < w:
        raise ValueError(f"ppo: with {w} data-parallel ranks, prompts_per_iter ({cfg.prompts_per_iter}), "
                         f"minibatch_size ({cfg.minibatch_size}) and the last minibatch ({last or cfg.minibatch_size} of {n} "
                         f"sequences) must each be >= {w}")


@exclusive
def train_ppo(cfg: PPOConfig, out_dir: str | Path, *, stop_after: int | None = None,
              plots: bool = True) -> PPOResult:
    """Run (or resume) PPO into `out_dir`; final models in `out_dir/final/{policy,value}`.

    `stop_after`: stop (checkpointed, resumable) after this many iterations; `plots`: write the curves PNG.
    """
    out = Path(out_dir)
    algo = algorithms.get(cfg.algorithm)
    if not (cfg.policy and cfg.prompts and (cfg.reward_model or cfg.reward_fn)):
        raise ConfigError("ppo: `policy`, `prompts` and `reward_model` or `reward_fn` (or both) are required")
    if algo.critic and not cfg.reward_model:
        raise ConfigError(f"ppo.reward_model: required by algorithm {cfg.algorithm!r} (the value model starts from it)")
    reward_fn = rfn.load(cfg.reward_fn) if cfg.reward_fn else None
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ConfigError("ppo.ptx_data: required when ptx_coef > 0")
    run = TrainRun("ppo", out, to_dict(cfg), save_every=cfg.save_every, stop_after=stop_after,
                   keep_checkpoints=cfg.keep_checkpoints)
    final = out / "final"
    value_dir = final / "value" if algo.critic else None
    if run.already_finished():
        return PPOResult(final / "policy", value_dir, run.step, run.skipped, run.info["elapsed_s"])
    policy = load_model(cfg.policy, "ppo.policy")  # first: an architecture we do not cover is one line, at once
    tokenizer = load_tokenizer(cfg.policy, "ppo.policy")
    if cfg.reward_model:
        preflight.check_same_tokenizer(tokenizer, cfg.policy, cfg.reward_model)
    preflight.warn_unused_ptx(cfg.ptx_data, cfg.ptx_coef)
    device = resolve_device(cfg.device)
    dtype = precision.resolve_dtype(cfg.model_dtype, cfg.policy)  # frozen models and outputs; trained: fp32
    value = ScalarHeadModel.from_pretrained(cfg.reward_model) if algo.critic else None
    if cfg.lora.r:  # only adapters (+ the value head) train; the reference is the policy's base, adapters off
        lora.apply_lora(policy, cfg.lora, seed=cfg.seed)
        if value is not None:
            lora.apply_lora(value, cfg.lora, seed=cfg.seed + 1)
    ref, rm = (m.to(device=device, dtype=dtype) if m is not None else None
               for m in load_frozen_pair("" if cfg.lora.r else cfg.policy, cfg.reward_model))
    _check_world(cfg)
    train = dict(device=device, parallel_cfg=cfg.parallel, gradient_checkpointing=cfg.gradient_checkpointing,
                 mixed_precision=cfg.mixed_precision)
    policy, value = (prepare(m, **train) if m is not None else None for m in (policy, value))
    ref = policy if cfg.lora.r else ref  # no second copy: `packed_passes.score_rollout` switches the adapters off
    if cfg.parallel.shard_frozen:
        frozen = dict(train, gradient_checkpointing=False)
        ref, rm = (prepare(m, **frozen) if m is not None and m is not policy else m for m in (ref, rm))
    prompts = preflight.load_rollout_prompts(cfg.prompts, tokenizer, policy, max_len=cfg.max_len,
                                             max_new_tokens=cfg.sampling.max_new_tokens, overlong=cfg.overlong)
    budget = preflight.prompt_budget(cfg.max_len, policy, cfg.sampling.max_new_tokens)
    warn_prompts_cut(prompts, cfg.prompts, budget=budget, max_len=cfg.max_len, positions=context_length(policy),
                     max_new_tokens=cfg.sampling.max_new_tokens, log=log)  # most prompts cut: say why, with numbers
    ptx = (load_texts(cfg.ptx_data, tokenizer, fit_len(cfg.ptx_max_len, context_length(policy)))
           if cfg.ptx_data and cfg.ptx_coef > 0 else [])
    record_truncation(out, {cfg.prompts: prompts, cfg.ptx_data: ptx})
    trainer = PPOTrainer(cfg, policy, value, ref, rm, tokenizer, ptx, reward_fn)
    models = {"policy": policy, **({"value": value} if value is not None else {})}
    run.resume(models, trainer.opt, trainer.sched, total=cfg.iterations,
               tokenizer=tokenizer, extra_state={"kl_controller": trainer.kl_ctl})
    trainer.skipped = run.skipped

    per_epoch = max(1, len(prompts) // cfg.prompts_per_iter)  # full prompt batches only

    def one_iteration(step: int) -> dict:
        epoch, pos = divmod(step, per_epoch)
        batch = epoch_batches([0] * len(prompts), cfg.prompts_per_iter, seed=cfg.seed, epoch=epoch)[pos]
        m = trainer.iteration([prompts[i].ids for i in batch], step, [prompts[i].raw for i in batch])
        run.skipped = trainer.skipped
        return m

    def show(m: dict) -> dict:
        return {"tokens": round(m["response_len"] * cfg.prompts_per_iter * cfg.sampling.n), "reward": m["score"],
                **{k: m[k] for k in ("kl", "pg_loss", "vf_loss") if k in m}}

    if not run.loop(one_iteration, show=show):
        return PPOResult(run.ckpt_dir, run.ckpt_dir if algo.critic else None, run.step, run.skipped, run.elapsed())
    if plots:
        run.metrics.plot(["score", "kl", "kl_coef", "response_len", "pg_loss", "vf_loss", "entropy", "clip_frac"],
                         out / "ppo_curves.png", "PPO")
    run.finish({final / "policy": policy, **({value_dir: value} if value is not None else {})}, dtype=dtype,
               base_dirs={final / "policy": cfg.policy, **({value_dir: cfg.reward_model} if value is not None else {})})
    return PPOResult(final / "policy", value_dir, run.step, run.skipped, run.elapsed())


def rollout_stats(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, correction) -> dict:
    """Per-iteration rollout-vs-trainer figures (`ops.rollout_correction`): the k3 KL, the max |dlogp|, the fractions
    of tokens whose ratio leaves [0.9, 1.1] and [0.99, 1.01], and what `correction` takes out of the gradient."""
    _, _, st = ops.rollout_correction(old_logp, rollout_logp, mask, correction)
    return {"rollout_k3_kl": float(st.k3_kl), "rollout_max_abs_dlogp": float(st.max_abs_dlogp),
            "rollout_outside_10pct": float(st.outside_10pct), "rollout_outside_1pct": float(st.outside_1pct),
            "rollout_masked_frac": float(st.masked_frac)}

