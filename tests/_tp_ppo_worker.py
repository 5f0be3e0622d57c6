"""PPO under tensor parallelism (`ppo.parallel.tp`) at world size 1 (the test process, tp 1) and under torchrun:
world 2 (tp 2) and world 4 (dp 2 x tp 2), for `tests/test_tensor_parallel.py`. It rides on the reward model's
launches (`python -m tests._tp_worker OUT rm` calls `run` after the RM checks: one launch per world for both), and
each rank writes what it saw to `OUT/ppo_w<world>_rank<r>.pt`; the test compares the worlds.

The models are the test's SFT policy (`ROOT/sft1/final`) and reward model (`ROOT/rm1/final`: also the value model's
start), prepared as `train_ppo` prepares them (split over tp, FSDP2 over dp, the frozen ones too). On a fixed
rollout (`rollout()`: 6 prompts x 2 completions of unequal lengths, ids from both tp ranks' vocabulary halves, no
engine):

- the frozen passes (`packed_passes.score_rollout`: policy and reference log-probs, values, reward scores) and the
  policy's entropy;
- one PPO minibatch step as the stage takes it (`PPOTrainer.minibatch_step`: this dp rank's sequences in micro-batches
  of 2, the fused step's vocab-parallel form with the KL-in-loss and entropy terms, the clipped value loss): the loss,
  the global stats, every parameter's whole gradient, each model's gradient norm, the weights after one AdamW step;
- this rank's bytes of parameters, gradients and AdamW state (policy, value) and of a KV-cache block;
- the shape of every tensor a collective moved during the passes and the step (`Collectives`: c10d and functional
  collectives seen by a dispatch mode), for the test to check that no (tokens, vocabulary) logits were gathered.

Then the stage, `train_ppo` with parallel.tp = 2 for 2 iterations (rollouts by the engine under tp): a run stopped
after the first iteration (the test resumes it in one process: tp 2 -> 1, dp 2 x tp 2 -> 1) and a copy of it resumed
here (the whole run in this layout); the test's one-process run stopped so, copied to `ppo1s_w<world>`, resumed here
(1 -> tp 2, 1 -> dp 2 x tp 2).
"""
from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_fast import distributed as dist
from rlhf_fast.config import KLConfig, OptimConfig, ParallelConfig, PPOConfig
from tests._tp_worker import full, local, named, nbytes

TP = 2
MINIBATCH = [0, 3, 5, 2, 7, 10, 11]  # one global minibatch of the fixed rollout: whole and split prompt groups


def ppo_config(root: Path, tp: int, **kw) -> PPOConfig:
    """2 iterations of 4 prompts x 2 samples, minibatches of 4, micro-batches of 2, an entropy bonus, from the test's
    SFT and reward models."""
    sampling = dataclasses.replace(PPOConfig().sampling, max_new_tokens=6, n=2)
    base = dict(policy=str(root / "sft1" / "final"), reward_model=str(root / "rm1" / "final"),
                prompts=str(root / "task" / "data" / "ppo_prompts.jsonl"), iterations=2, prompts_per_iter=4,
                ppo_epochs=2, minibatch_size=4, device="cpu", entropy_coef=0.01, sampling=sampling,
                kl=KLConfig(target=2.0), optim=OptimConfig(lr=1e-3, schedule="constant"),
                parallel=ParallelConfig(micro_batch_size=2, tp=tp))
    return PPOConfig(**{**base, **kw})


def rollout(vocab: int):
    """(prompts, completions) of a fixed rollout: 6 prompts of 3..8 tokens, 2 completions each of 1..6 tokens, ids
    over the whole vocabulary (both halves)."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(6)]
    comps = []
    for i in range(12):
        ids = torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        ids[0] = (3, vocab - 1)[i % 2]
        comps.append(types.SimpleNamespace(token_ids=ids, prompt_index=i // 2))
    return prompts, comps


def trainer_for(cfg: PPOConfig):
    """`PPOTrainer` on the models of `cfg` prepared as `train_ppo` prepares them (at this world size and cfg's tp)."""
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models import load_model
    from rlhf_fast.models.loading import load_tokenizer
    from rlhf_fast.stages.common import prepare
    from rlhf_fast.stages.ppo import PPOTrainer, load_frozen_pair

    dist.use_tp(cfg.parallel.tp)
    policy, tok = load_model(cfg.policy), load_tokenizer(cfg.policy)
    value = ScalarHeadModel.from_pretrained(cfg.reward_model)
    ref, rm = load_frozen_pair(cfg.policy, cfg.reward_model)
    train = dict(device=torch.device("cpu"), parallel_cfg=cfg.parallel)
    policy, value, ref, rm = (prepare(m, **train) for m in (policy, value, ref, rm))
    return PPOTrainer(cfg, policy, value, ref, rm, tok)


class Collectives(TorchDispatchMode):
    """Records the shapes of the tensors every collective op (c10d's and the functional ones DTensor uses) is given
    while active."""

    KINDS = ("all_gather", "allgather", "all_reduce", "allreduce", "reduce_scatter", "broadcast", "all_to_all")

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[str, tuple[int, ...]]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(k in name for k in self.KINDS):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.shapes.update((name, tuple(t.shape)) for t in leaves if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))


def minibatch_checks(root: Path, tp: int) -> dict:
    """The frozen passes on the fixed rollout, one minibatch step (KL in the loss, entropy bonus, value loss) and
    the bytes this rank holds; see the module docstring."""
    from rlhf_fast.stages import experience as xp
    from rlhf_fast.stages import packed_passes as pp

    cfg = ppo_config(root, tp, old_logp="recompute", kl=KLConfig(coef=0.1, kind="k3", placement="loss"))
    trainer = trainer_for(cfg)
    policy, value = trainer.policy, trainer.value
    prompts, comps = rollout(policy.vocab_size)
    ro = xp.make_rollout(prompts, comps, trainer.pad_id)
    seen = Collectives()
    with torch.no_grad(), seen:
        (old, ref_lp, values, scores), _ = pp.score_rollout(cfg, policy, trainer.ref, value, trainer.rm, ro, comps)
        logp, ent = pp.policy_logprobs(policy, ro, 1.0, entropy=True)
    exp = xp.advantages(ro, old, ref_lp, values, scores, kl_coef=0.0, kl_kind="k3", gamma=1.0, lam=0.95)
    g = torch.Generator().manual_seed(1)  # the behaviour policy and old values a little off: ratios and clipping
    exp = exp._replace(old_logp=exp.old_logp + 0.2 * torch.randn(exp.old_logp.shape, generator=g) * ro.mask,
                       old_values=exp.old_values + 0.3 * torch.randn(exp.old_values.shape, generator=g) * ro.mask)
    policy.train()
    value.train()
    with seen:
        loss, stats = trainer.minibatch_step(exp, torch.tensor(MINIBATCH), [])
    models = {"policy": policy, "value": value}
    grads = {f"{k}.{n}": full(p.grad) for k, m in models.items() for n, p in named(m)}
    norms = [dist.clip_grad_norm(gr, float("inf")) for gr in trainer.groups]
    sizes = {k: {"params": nbytes(p for _, p in named(m)), "grads": nbytes(p.grad for _, p in named(m))}
             for k, m in models.items()}
    trainer.opt.step()
    state = trainer.opt.state
    for k, m in models.items():
        sizes[k]["optim"] = nbytes(v for _, p in named(m) for n, v in state[p].items() if n != "step")
    sizes["kv_block"] = trainer.generator.bytes_per_block
    sizes["state_mib"] = dist.local_state_mib(models, trainer.opt)
    split = {f"{k}.{n}": _is_tp(p) for k, m in models.items() for n, p in named(m)}
    return {"old_logp": old, "ref_logp": ref_lp, "values": values, "scores": scores, "logp": logp, "entropy": ent,
            "loss": dist.all_sum(float(loss)), "stats": stats, "grads": grads, "norms": norms, "bytes": sizes,
            "split": split, "collectives": sorted(seen.shapes), "vocab": policy.vocab_size,
            "hidden_size": policy.args.hidden_size, "stepped": {f"{k}.{n}": full(p) for k, m in models.items() for n, p in named(m)}}


def _is_tp(p: torch.Tensor) -> bool:
    return local(p) is not p and "tp" in (p.device_mesh.mesh_dim_names or ())


def stage_runs(root: Path) -> None:
    """`train_ppo` with tp 2 at this world size: a run stopped after one iteration (`ppos_w<world>`, which the test
    resumes in one process), a copy of it resumed here to the end (`ppo_w<world>`: the whole run, as a stop and
    resume in one layout is bitwise the uninterrupted run, tests/test_distributed.py), and the one-process stopped
    run (copied by the test to `ppo1s_w<world>`) resumed to its end."""
    from rlhf_fast.stages.ppo import train_ppo

    w = dist.world_size()
    train_ppo(ppo_config(root, TP), root / f"ppos_w{w}", stop_after=1, plots=False)
    if dist.is_main():
        shutil.copytree(root / f"ppos_w{w}", root / f"ppo_w{w}")
    dist.barrier()
    train_ppo(ppo_config(root, TP), root / f"ppo_w{w}", plots=False)
    train_ppo(ppo_config(root, TP), root / f"ppo1s_w{w}", plots=False)


def run(root: Path, out: Path) -> None:
    """Every PPO check at this world size (under torchrun, tp 2), the models and runs under `root`."""
    res = minibatch_checks(root, TP)
    stage_runs(root)
    torch.save(res, out / f"ppo_w{dist.world_size()}_rank{dist.rank()}.pt")
