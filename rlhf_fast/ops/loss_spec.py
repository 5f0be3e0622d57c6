"""The loss specification every PPO-family op takes: `PPOClip` (the surrogate's clipping), `PPOAgg` (how per-token
losses are reduced, with its normalisers), `KLTerm` (the KL-in-loss term) and `RolloutCorrection` (importance
weights and rejection for rollout log-probs that differ from the trainer's).

`PPOAgg.token_weights` is the one definition of the aggregation modes: the reference, the PyTorch path, the Triton
and native kernels' drivers and the fused step all reduce with these weights. With l_{b,t} the per-token loss and
valid tokens only:

  token-mean               sum(l) / num_tokens              (default: number of valid tokens)
  token-sum                sum(l)
  seq-mean-token-sum       sum_b(sum_t l) / num_seqs        (default: number of rows with a valid token)
  seq-mean-token-mean      sum_b(mean_t l) / num_seqs
  seq-mean-token-sum-norm  sum(l) / norm                    (default: T, the padded length; a constant)

so the loss is sum_{b,t} w_{b,t} l_{b,t} with w = d loss / d l, constant within a row. A data-parallel caller passes
the global num_tokens / num_seqs (a number, or a 1-element tensor to avoid a host sync) so the summed loss is
invariant to sharding. A normaliser of 0 (a fully masked batch) gives loss 0 with zero gradients. A new mode or
normaliser is one row of `_MODES`.

The peers' modes, for callers that port a trainer:
  * verl `agg_loss(loss_mat, mask, mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)`: the same
    mode names; token-mean -> num_tokens = batch_num_tokens / dp_size, seq-* -> num_seqs = global_batch_size /
    dp_size (verl counts only non-empty rows by default, as we do), seq-mean-token-sum-norm -> norm =
    loss_scale_factor (default T).
  * TRL GRPOTrainer `loss_type`: grpo -> seq-mean-token-mean with num_seqs = batch size (TRL averages over every row),
    bnpo -> token-mean, dapo -> token-mean with num_tokens = num_items_in_batch / num_processes, dr_grpo (Liu et al.
    2025, "Dr. GRPO") -> seq-mean-token-sum-norm with norm = batch size * max_completion_length.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")
ROLLOUT_CORRECTION_MODES = ("none", "tis", "mis", "icepop", "geo_mask")


def _count_tokens(row_counts: torch.Tensor, length: int) -> torch.Tensor:
    return row_counts.sum()


def _count_seqs(row_counts: torch.Tensor, length: int) -> torch.Tensor:
    return (row_counts > 0).sum()


def _padded_length(row_counts: torch.Tensor, length: int) -> torch.Tensor:
    return torch.tensor(float(length), dtype=torch.float64, device=row_counts.device)


# mode -> (normaliser field of PPOAgg or None, what it defaults to from (row counts, T), each row first averaged
# over its tokens)
_MODES = {
    "token-mean": ("num_tokens", _count_tokens, False),
    "token-sum": (None, None, False),
    "seq-mean-token-sum": ("num_seqs", _count_seqs, False),
    "seq-mean-token-mean": ("num_seqs", _count_seqs, True),
    "seq-mean-token-sum-norm": ("norm", _padded_length, False),
}
AGG_MODES = tuple(_MODES)
_NORMALISERS = ("num_tokens", "num_seqs", "norm")
RATIO_LEVELS = ("token", "sequence", "sequence-sum")


@dataclasses.dataclass(frozen=True)
class PPOClip:
    """The importance ratio of the PPO surrogate and its clipping (Schulman et al. 2017, eq. 7; dual clip: Ye et
    al. 2020; clip-higher: DAPO, Yu et al. 2025).

    `level` chooses the ratio r of token t of sequence b, with lr = logp - old_logp over the row's valid tokens:
      token         r = exp(lr_t)                                      (PPO, GRPO, DAPO)
      sequence      r = exp(mean_t lr) = (pi(y|x) / pi_old(y|x))^(1/|y|), in GSPO's stop-gradient form
                    log r_t = sg[mean_t lr] + logp_t - sg[logp_t] (Zheng et al. 2025; verl
                    `compute_policy_loss_gspo`; TRL GRPO `importance_sampling_level="sequence"`, whose gradient it
                    equals when the advantages and importance weights are constant over each sequence, as in GRPO)
      sequence-sum  r = exp(sum_t lr) = pi(y|x) / pi_old(y|x), the whole sequence's likelihood ratio, differentiated
                    exactly: d r / d logp_t = r for every valid t, so each token gets the row's summed derivative
                    (TRL RLOOTrainer: with (batch,) advantages and PPOAgg("seq-mean-token-mean", num_seqs=batch) the
                    loss is its mean_b max(-A_b r_b, -A_b clip(r_b)))
    so on the sequence levels every token of a row shares the ratio (and its clipping); with `sequence` the gradient
    of token t flows through logp_t alone: d l_t / d logp_t = -A_t r where unclipped. The log ratio is clamped to
    [-20, 20] before exp on every level (gradient 0 outside; verl's GSPO clamps at 10 from above only).
    """

    low: float = 0.2  # ratio clipped below at 1 - low
    high: float | None = None  # ratio clipped above at 1 + high; None: same as low (DAPO "clip-higher" if larger)
    dual: float | None = None  # dual clip c > 1: loss <= -c * A for A < 0; None: off
    level: str = "token"  # token | sequence (GSPO) | sequence-sum (TRL RLOO), see above

    def __post_init__(self):
        if not isinstance(self.low, numbers.Real) or not 0 <= self.low < 1:
            raise ValueError(f"PPOClip.low must be in [0, 1), got {self.low!r}")
        if self.high is not None and (not isinstance(self.high, numbers.Real) or not 0 <= self.high < math.inf):
            raise ValueError(f"PPOClip.high must be a finite number >= 0 or None, got {self.high!r}")
        if self.dual is not None and (not isinstance(self.dual, numbers.Real) or not 1 < self.dual < math.inf):
            raise ValueError(f"PPOClip.dual must be a finite number > 1 or None, got {self.dual!r}")
        if self.level not in RATIO_LEVELS:
            raise ValueError(f"PPOClip.level must be one of {RATIO_LEVELS}, got {self.level!r}")

    @property
    def lower(self) -> float:
        """The ratio's lower clip bound 1 - low."""
        return 1.0 - float(self.low)

    @property
    def upper(self) -> float:
        """The ratio's upper clip bound 1 + high (high defaulting to low)."""
        return 1.0 + float(self.low if self.high is None else self.high)


def _check_count(name: str, val) -> None:
    if isinstance(val, torch.Tensor):
        if val.numel() != 1 or val.is_complex() or val.dtype == torch.bool:
            raise ValueError(f"PPOAgg.{name} must be a single non-negative number; got a tensor of shape "
                             f"{tuple(val.shape)}, dtype {val.dtype}")
    elif isinstance(val, bool) or not isinstance(val, numbers.Real) or not 0 <= val < math.inf:
        raise ValueError(f"PPOAgg.{name} must be a non-negative finite number (or a 1-element tensor) or None; "
                         f"got {val!r}")


@dataclasses.dataclass(frozen=True)
class PPOAgg:
    """How per-token losses are reduced (see the module docstring), with optional global normalisers."""

    mode: str = "token-mean"  # one of AGG_MODES
    num_tokens: float | torch.Tensor | None = None  # token-mean: global number of valid tokens; None: this batch's
    num_seqs: float | torch.Tensor | None = None  # seq-mean-token-{sum,mean}: global number of sequences; None: rows
    #                                              with a valid token
    norm: float | torch.Tensor | None = None  # seq-mean-token-sum-norm: the constant divisor; None: T
    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"PPOAgg.mode must be one of {AGG_MODES}, got {self.mode!r}")
        for name in _NORMALISERS:
            val = getattr(self, name)
            if val is None:
                continue
            if _MODES[self.mode][0] != name:
                modes = tuple(m for m, spec in _MODES.items() if spec[0] == name)
                raise ValueError(f"PPOAgg.{name} is only used by the modes {modes}; got mode={self.mode!r}")
            _check_count(name, val)

    @classmethod
    def of(cls, agg: PPOAgg | str) -> PPOAgg:
        """`agg` itself, or `PPOAgg(agg)` for a mode string."""
        if isinstance(agg, cls):
            return agg
        if isinstance(agg, str):
            return cls(agg)
        raise TypeError(f"agg must be a PPOAgg or one of {AGG_MODES}, got {type(agg).__name__}")

    def row_weights(self, row_counts: torch.Tensor, length: int) -> torch.Tensor:
        """(batch,) float64 d loss / d l_{b,t} for the valid tokens of each row, from their (batch,) counts and the
        padded length T."""
        field, default, per_row = _MODES[self.mode]
        cnt = row_counts.to(torch.float64)
        w = torch.ones_like(cnt)
        if per_row:
            w = w / cnt.clamp(min=1)
        if field is not None:
            given = getattr(self, field)
            n = default(cnt, length) if given is None else \
                torch.as_tensor(given, device=cnt.device).reshape(()).to(torch.float64)
            w = w / torch.where(n > 0, n, 1)  # a normaliser of 0: nothing is valid, the loss is 0 anyway
        return w

    def token_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(batch, T) float64 d loss / d l_{b,t} for a (batch, T) 0/1 valid mask: 0 where the mask is 0."""
        m = mask.bool()
        return self.row_weights(m.sum(-1), m.shape[-1])[:, None] * m

    def aggregate(self, tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The 0-d reduction sum(w * tok) of a (batch, T) per-token loss over the mask (tok's dtype; entries outside
        the mask are never read, so they may hold NaN)."""
        m = mask.bool()
        zero = torch.zeros((), dtype=tok.dtype, device=tok.device)
        return (torch.where(m, tok, zero) * self.token_weights(m).to(tok.dtype)).sum()


@dataclasses.dataclass(frozen=True, eq=False)
class KLTerm:
    """The KL-in-loss term coef * agg(kl_penalty(logp, ref_logp, kind)) (Schulman's k1/k2/k3 or |lr| estimators)."""

    ref_logp: torch.Tensor  # (batch, T) reference-policy log-probs of the sampled tokens
    coef: float  # weight of the term in the loss
    kind: str = "k3"  # k1 | k2 | k3 | abs

    def __post_init__(self):
        if not isinstance(self.ref_logp, torch.Tensor) or not self.ref_logp.is_floating_point():
            got = f"dtype {self.ref_logp.dtype}" if isinstance(self.ref_logp, torch.Tensor) else \
                type(self.ref_logp).__name__
            raise TypeError(f"KLTerm.ref_logp must be a floating-point tensor, got {got}")
        if isinstance(self.coef, bool) or not isinstance(self.coef, numbers.Real) or not math.isfinite(self.coef):
            raise ValueError(f"KLTerm.coef must be a finite number, got {self.coef!r}")
        if self.kind not in KL_KINDS:
            raise ValueError(f"KLTerm.kind must be one of {KL_KINDS}, got {self.kind!r}")


def _check_bound(name: str, val, *, allow_none: bool) -> None:
    if val is None and allow_none:
        return
    if isinstance(val, bool) or not isinstance(val, numbers.Real) or not 0 < val < math.inf:
        tail = " or None" if allow_none else ""
        raise ValueError(f"RolloutCorrection.{name} must be a finite number > 0{tail}, got {val!r}")


@dataclasses.dataclass(frozen=True)
class RolloutCorrection:
    """How the loss corrects for rollout log-probs that differ from the trainer's (bf16 or mixed precision, a
    recomputed old_logp, non-deterministic kernels, asynchronous rollouts): `ops.rollout_correction` turns it into
    per-token importance weights and a keep mask, which `ppo_policy_loss` / `ppo_loss_from_hidden` apply when given
    `rollout_logp=`.

    With w_t = exp(old_logp_t - rollout_logp_t) = pi_train_old / pi_rollout per valid token (old_logp: the trainer's
    log-prob of the behaviour policy; rollout_logp: the engine's), W = exp(sum_t log w_t) per sequence (level
    "sequence") and G = exp(mean_t log w_t) (the geometric mean), each log ratio clamped to [-20, 20] before exp, and
    r the ratio of the chosen level (w_t or W, on every token of the row):

      none      no weight, nothing dropped; the stats (rollout-vs-trainer KL, max |dlogp|, ...) are still logged
      tis       truncated IS: weight min(r, cap) (max(., lo) too when lo is set)
      mis       masked IS as rejection: tokens (level token) or whole sequences (level sequence) with r outside
                [lo, hi] are dropped from the loss and its normalisers, like a NaN token; the kept ones get no weight
      icepop    weight r where r is in [lo, hi], else 0; zero-weight tokens stay in the normalisers (IcePop, Ling
                team, Ring-1T 2025: M(r; alpha, beta) = r inside, 0 outside, at the token level; TRL calls it MIS)
      geo_mask  rows whose G is outside [lo, hi] are dropped (sequence level by definition)

    A bound of None is no bound on that side; [lo, hi] must contain 1 and cap be >= 1, so that rollout_logp ==
    old_logp changes nothing. Peer equivalents (verl 0.9 `compute_rollout_correction_and_rejection_mask`, whose
    log_ratio is ours; TRL GRPOTrainer `vllm_importance_sampling_mode` with clip_min / clip_max):
      tis token / sequence       verl rollout_is="token" / "sequence", rollout_is_threshold=cap;
                                 TRL token_truncate / sequence_truncate, clip_max=cap, clip_min=lo
      icepop token / sequence    verl rollout_is="token" / "sequence", rollout_is_threshold=f"{lo}_{hi}";
                                 TRL token_mask / sequence_mask, clip_min=lo, clip_max=hi
      mis token / sequence       verl rollout_rs="token_k1" / "seq_sum_k1" with rollout_rs_threshold=f"{1/hi}_{1/lo}"
                                 (verl's k1 is log(pi_rollout / pi_train): the same bounds when lo = 1/hi);
                                 verl <= 0.6 rollout_is_mode="mask" at that level (its mask; it weighted by r too)
      geo_mask                   verl rollout_rs="seq_mean_k1", same thresholds as mis; verl <= 0.6
                                 rollout_is_level="geometric" with rollout_is_mode="mask"
    """

    mode: str = "none"  # none | tis | mis | icepop | geo_mask, see above
    level: str | None = None  # token | sequence (tis, mis, icepop); None: token, and sequence for geo_mask
    cap: float = 2.0  # tis: weights truncated above at cap (verl's default rollout_is_threshold 2.0; TRL's 3.0)
    lo: float | None = None  # mis, icepop, geo_mask: lower bound of the kept ratios; tis: optional floor
    hi: float | None = None  # mis, icepop, geo_mask: upper bound of the kept ratios

    def __post_init__(self):
        if self.mode not in ROLLOUT_CORRECTION_MODES:
            raise ValueError(f"RolloutCorrection.mode must be one of {ROLLOUT_CORRECTION_MODES}, got {self.mode!r}")
        level = self.level
        if level is None:
            level = "sequence" if self.mode == "geo_mask" else "token"
            object.__setattr__(self, "level", level)
        allowed = ("sequence",) if self.mode == "geo_mask" else ("token", "sequence")
        if level not in allowed:
            raise ValueError(f"RolloutCorrection.level must be one of {allowed} for mode {self.mode!r}, got "
                             f"{level!r}")
        _check_bound("cap", self.cap, allow_none=False)
        _check_bound("lo", self.lo, allow_none=True)
        _check_bound("hi", self.hi, allow_none=True)
        if self.cap < 1:
            raise ValueError(f"RolloutCorrection.cap must be >= 1 (an on-policy token keeps weight 1), got "
                             f"{self.cap!r}")
        if self.lo is not None and self.lo > 1:
            raise ValueError(f"RolloutCorrection.lo must be <= 1 (an on-policy token is kept), got {self.lo!r}")
        if self.hi is not None and self.hi < 1:
            raise ValueError(f"RolloutCorrection.hi must be >= 1 (an on-policy token is kept), got {self.hi!r}")
        if self.mode == "tis" and self.hi is not None:
            raise ValueError(f"RolloutCorrection.hi is not used by mode 'tis' (it truncates at cap); got "
                             f"hi={self.hi!r}")
        if self.mode in ("mis", "icepop", "geo_mask") and self.lo is None and self.hi is None:
            raise ValueError(f"RolloutCorrection.lo / RolloutCorrection.hi: mode {self.mode!r} needs at least one "
                             f"bound, got lo=None, hi=None")

    @property
    def bounds(self) -> tuple[float, float]:
        """(lower, upper): the kept ratio range of mis / icepop / geo_mask, tis's (floor, cap); 0 / inf if unset."""
        upper = self.cap if self.mode == "tis" else (math.inf if self.hi is None else float(self.hi))
        return (0.0 if self.lo is None else float(self.lo)), upper
