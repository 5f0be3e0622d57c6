"""From sampled completions to PPO's training tensors: the rollout's layout (`Rollout`: the sequences, their labels
and the positions that predict them), per-token rewards and advantages (`Experience`). The model passes over a
rollout are in `stages.packed_passes`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast import distributed, ops
from rlhf_fast.data import IGNORE_INDEX


class Rollout(NamedTuple):
    """N = prompts x samples sequences, prompt + response, right-padded; R = longest response."""

    input_ids: torch.Tensor  # (N, T) int64
    lengths: torch.Tensor  # (N,) prompt + response tokens
    positions: torch.Tensor  # (N, R) index into T of the hidden state that predicts each response token
    labels: torch.Tensor  # (N, R) response token ids, IGNORE_INDEX on padding
    prompt_index: list[int]  # (N,) which prompt each sequence continues
    support: torch.Tensor | None = None  # (N, R) fp32: the engine's support threshold per token (top-k/top-p)
    routes: list[torch.Tensor] | None = None  # (N,) a mixture-of-experts policy's rollout routes per sequence,
    # (M, prompt + response - 1, k) int16 (`Completion.routes`), replayed by its passes (`ppo.moe_routing`)

    @property
    def mask(self) -> torch.Tensor:
        """(N, R) float32: 1 on response tokens, 0 on padding."""
        return (self.labels != IGNORE_INDEX).float()

    def to(self, device: torch.device) -> "Rollout":
        return self._replace(**{k: v.to(device) for k, v in self._asdict().items() if isinstance(v, torch.Tensor)})

    def select(self, idx: torch.Tensor) -> "Rollout":
        """Rows `idx`, trimmed to their own longest sequence and response."""
        idx = idx.to(self.lengths.device)
        lengths = self.lengths[idx]
        r = max(1, int((self.labels[idx] != IGNORE_INDEX).sum(1).max()))
        t = int(lengths.max())
        return Rollout(self.input_ids[idx, :t], lengths, self.positions[idx, :r].clamp(max=t - 1),
                       self.labels[idx, :r], [self.prompt_index[i] for i in idx.tolist()],
                       None if self.support is None else self.support[idx, :r],
                       None if self.routes is None else [self.routes[i] for i in idx.tolist()])


def make_rollout(prompts: list[list[int]], completions, pad_id: int, device: torch.device | None = None) -> Rollout:
    """Pack `completions` (of `prompts[c.prompt_index]`) into padded tensors (on `device`)."""
    n = len(completions)
    r = max(1, max(len(c.token_ids) for c in completions))
    seqs = [prompts[c.prompt_index] + list(c.token_ids) for c in completions]
    t = max(len(s) for s in seqs)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, r), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, r), dtype=torch.long)
    for i, (c, s) in enumerate(zip(completions, seqs)):
        p, m = len(prompts[c.prompt_index]), len(c.token_ids)
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, :m] = torch.tensor(c.token_ids, dtype=torch.long)
        positions[i] = (p - 1 + torch.arange(r)).clamp(max=t - 1)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    support = None
    if all(getattr(c, "support_threshold", None) is not None for c in completions):
        support = torch.full((n, r), float("-inf"), dtype=torch.float32)
        for i, c in enumerate(completions):
            support[i, :len(c.token_ids)] = c.support_threshold.float().cpu()
    routes = None
    if all(getattr(c, "routes", None) is not None for c in completions):
        routes = [c.routes for c in completions]
    ro = Rollout(ids, lengths, positions, labels, [c.prompt_index for c in completions], support, routes)
    return ro.to(device) if device is not None else ro


def logprob_kwargs(sampling, ro: Rollout, *, replay: bool = True) -> dict:
    """The log-prob ops' `temperature`, `top_k`, `top_p` and support arguments for the distribution PPO's rollouts
    sample from (`sampling`: a `SamplingConfig`). The support under top-k / top-p: the rollout's recorded
    thresholds when `sampling.support` is "replay" and the generator recorded them (the policy's own passes,
    `replay`), else recomputed from the model's logits (and always for the frozen reference, whose logits are
    another model's)."""
    kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if replay and sampling.support == "replay" and ro.support is not None and (sampling.top_k or sampling.top_p < 1):
        kw.update(support="replay", support_threshold=ro.support.to(ro.labels.device))
    return kw


class Experience(NamedTuple):
    rollout: Rollout
    old_logp: torch.Tensor  # (N, R)
    ref_logp: torch.Tensor  # (N, R)
    old_values: torch.Tensor  # (N, R)
    scores: torch.Tensor  # (N,) reward model
    advantages: torch.Tensor  # (N, R) whitened
    returns: torch.Tensor  # (N, R)
    kl: torch.Tensor  # (N,) per-sequence sum of log pi - log pi_ref (k1)
    train: torch.Tensor  # (N,) bool: rows the update trains on (DAPO drops those of zero-std groups)
    rollout_logp: torch.Tensor | None = None  # (N, R) the generator's log-probs when old_logp is recomputed

    def select(self, idx: torch.Tensor) -> "Experience":
        ro = self.rollout.select(idx)
        idx = idx.to(ro.lengths.device)
        r = ro.mask.shape[1]
        return Experience(ro, *(None if x is None else x[idx, :r] if x.dim() == 2 else x[idx] for x in self[1:]))


def gather_scored(prompts: list[list[int]], completions, ro: Rollout, passes, pad_id: int) -> tuple[Rollout, tuple]:
    """Every rank's completions (of global `prompts`), and frozen passes (`score_rollout`'s four tensors on this
    rank's rollout `ro`), put together in rank order: the global batch, the same on every rank and in the order one
    process would have produced it. Under tensor parallelism the ranks of a tp group hold the same part: one per
    data-parallel rank is taken. `(ro, passes)` unchanged with one data-parallel rank."""
    if distributed.dp_size() == 1:
        return ro, passes
    comps = [c for part in distributed.all_gather_objects(list(completions), data=True) for c in part]
    ro = make_rollout(prompts, comps, pad_id, ro.input_ids.device)
    r = ro.labels.shape[1]
    *per_token, scores = passes  # old_values is None without a critic
    per_token = [None if x is None else distributed.all_gather_rows(x, data=True)[:, :r] for x in per_token]
    return ro, (*per_token, distributed.all_gather_rows(scores, data=True))


@torch.no_grad()
def advantages(ro: Rollout, old_logp, ref_logp, old_values, scores, *, kl_coef: float, kl_kind: str,
               gamma: float, lam: float) -> Experience:
    """r_t = score * [t last] - kl_coef * KL_t (`ops.token_rewards`), GAE, whitened advantages."""
    rewards = ops.token_rewards(scores, old_logp, ref_logp, ro.mask, kl_coef=kl_coef, kind=kl_kind)  # (N, R)
    adv, ret = ops.gae(rewards, old_values, ro.mask, gamma=gamma, lam=lam, whiten=True)
    kl = ((old_logp - ref_logp) * ro.mask).sum(1)
    return Experience(ro, old_logp, ref_logp, old_values, scores, adv, ret, kl,
                      torch.ones_like(scores, dtype=torch.bool))
