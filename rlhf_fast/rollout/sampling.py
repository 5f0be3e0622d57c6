"""Token sampling: greedy, temperature, top-k, top-p, and the log-probs of the distribution sampled from; one sampler,
graph-safe (no generator objects, no per-row launches, no host round trip), so it runs inside a compiled decode step.

Top-k / top-p cut the distribution at one threshold per row (`ops.support_threshold`: the k-th largest scaled logit
with its ties, then the smallest nucleus reaching top_p with the token that crosses it); the sampler returns the
sampled token's log-prob under that cut distribution (or the full one: `SamplingParams(logprobs="full")`) and the
threshold a trainer replays, so the trainer can compute the same distribution's log-probs (recomputed or replayed).

A sampled token is the inverse CDF of the (cut) distribution at one uniform per row. The uniform is Philox4x32-10
(`rollout/philox.py`) keyed by the request's seed at counter (position, sequence index): a sequence's draw depends on
nothing else, not on its batch, its row or its bucket, in eager and compiled steps alike. Tokens outside the kept set
have zero-width CDF steps and can never be drawn. On CPU (float32) the inverse CDF runs in csrc/sampling.cpp, one
row at a time in cache (max, chunked weight sums, scan to the threshold), behind `torch.library.custom_op`;
elsewhere as torch max / exp / cumsum / searchsorted.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast import _native, ops
from rlhf_fast.rollout import philox
from rlhf_fast.rollout.types import SamplingParams


def keep_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) bool: the tokens top-k and top-p keep for logits (B, V) (already divided by the temperature), by sorting;
    an independent check of `ops.support_threshold` (which the sampler uses) where no two logits tie.

    top-k keeps the k largest; top-p then keeps the smallest prefix of the sorted distribution whose probability
    reaches top_p (the most likely token is always kept).
    """
    v = logits.shape[-1]
    if (top_k == 0 or top_k >= v) and top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    if 0 < top_k < v:  # only the k candidates need sorting
        sorted_logits, order = logits.topk(top_k, dim=-1)  # (B, k), descending
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        keep_sorted &= mass_before < top_p
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)


class Draw(NamedTuple):
    """One sampled token per row. tokens (B,) int64; logprobs (B,) float32 (float64 for float64 logits), under the
    distribution sampled from (or the full one); thresholds (B,) float32, the support a trainer replays
    (`replay_threshold`; -inf where top-k / top-p cut nothing)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    thresholds: torch.Tensor


def sample(logits: torch.Tensor, params: SamplingParams, key: torch.Tensor, streams: torch.Tensor,
           positions: torch.Tensor, *, exact: bool = True) -> Draw:
    """Draw one token per row of logits (B, V) and its log-prob.

    params: temperature (0 = greedy: argmax, first index on ties; log-probs at temperature 1), top_k, top_p and
        logprobs ("sampled" | "full").
    key: (2,) int64, the request's seed (`philox.seed_key`); streams (B,): each row's sequence index; positions (B,):
        the position of the token each row's logits were computed at (so a sequence never reuses a draw).
    exact: the log-probs are `ops.token_logprobs`' bit for bit (what a deterministic trainer recomputes); False lets
        the CPU sampler take them from its own pass over the row (the same tokens; log-probs within float32
        rounding, ~1e-7, of the op's).

    On CPU (float32 logits, native extension built) the whole draw is one native call per step (`sample_fused_cpu`:
    Philox, temperature, cut, inverse CDF or argmax, log-prob), drawing the same tokens as the torch path below.
    """
    no_cut = torch.full(logits.shape[:1], float("-inf"), dtype=torch.float32, device=logits.device)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and _native.has("sample_fused_cpu"):
        return _sample_cpu(logits, params, key, streams, positions, exact, no_cut)
    logprobs = _opaque(_token_logprobs_op, _token_logprobs)  # (logits, tokens, temperature, top_k, top_p, thr)
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        return Draw(tokens, logprobs(logits, tokens, 1.0, 0, 1.0, None), no_cut)
    temp = params.logprob_temperature
    if not params.truncated(logits.shape[-1]):
        tokens = inverse_cdf(logits, temp, philox.uniform(key, streams, positions))
        return Draw(tokens, logprobs(logits, tokens, temp, 0, 1.0, None), no_cut)
    # (B,): the support each row samples from
    thr = _opaque(_support_threshold_op, _support_threshold)(logits, temp, params.top_k, params.top_p)
    tokens = inverse_cdf(logits, temp, philox.uniform(key, streams, positions), thr)
    if params.logprobs == "sampled":
        logp = logprobs(logits, tokens, temp, params.top_k, params.top_p, thr)
    else:
        logp = logprobs(logits, tokens, temp, 0, 1.0, None)
    return Draw(tokens, logp, replay_threshold(logits, temp, thr).float())


def _sample_cpu(logits: torch.Tensor, params: SamplingParams, key: torch.Tensor, streams: torch.Tensor,
                positions: torch.Tensor, exact: bool, no_cut: torch.Tensor) -> Draw:
    """`sample` on CPU float32 logits through `sample_fused_cpu` (a custom op inside torch.compile)."""
    fused = _opaque(_sample_fused_op, _sample_fused_native)
    streams, positions = streams.to(torch.int64), positions.to(torch.int64)
    if params.greedy:
        tokens, logp = fused(logits, key, streams, positions, 1.0, True, None, exact, 1.0, False)
        return Draw(tokens, logp, no_cut)
    temp = params.logprob_temperature
    if not params.truncated(logits.shape[-1]):
        tokens, logp = fused(logits, key, streams, positions, temp, False, None, exact, temp, False)
        return Draw(tokens, logp, no_cut)
    thr = _opaque(_support_threshold_op, _support_threshold)(logits, temp, params.top_k, params.top_p)
    # the log-probs over the support sampled from ("sampled") or the whole row ("full": always the op's own pass)
    tokens, logp = fused(logits, key, streams, positions, temp, False, thr, exact or params.logprobs != "sampled",
                         temp, params.logprobs == "sampled")
    return Draw(tokens, logp, replay_threshold(logits, temp, thr).float())


def _sample_fused_native(logits: torch.Tensor, key: torch.Tensor, streams: torch.Tensor, positions: torch.Tensor,
                         temperature: float, greedy: bool, threshold: torch.Tensor | None, exact: bool,
                         lp_temperature: float, lp_cut: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """csrc/sampling.cpp `sample_fused_cpu`: logits (B, V) float32 CPU, key (2,) int64, streams / positions (B,)
    int64, threshold (B,) float32 or None -> tokens (B,) int64, log-probs (B,) float32 (at `lp_temperature`, over
    the threshold's support when `lp_cut`, else the whole row)."""
    if logits.stride(-1) != 1 or logits.stride(0) < logits.shape[1]:
        logits = logits.contiguous()
    b, v = logits.shape
    for name, t in (("streams", streams), ("positions", positions)):
        if t.shape != (b,) or t.dtype != torch.int64:
            raise ValueError(f"sample: {name} must be ({b},) int64 for logits {tuple(logits.shape)}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    streams, positions, key = streams.contiguous(), positions.contiguous(), key.to(torch.int64).contiguous()
    thr = None if threshold is None else threshold.to(torch.float32).contiguous()
    tokens = torch.empty(b, dtype=torch.int64)
    logp = torch.empty(b, dtype=torch.float32)
    _native.fn("sample_fused_cpu")(
        logits.data_ptr(), b, v, logits.stride(0), 1.0 / temperature, int(greedy), 0 if thr is None else thr.data_ptr(),
        key.data_ptr(), streams.data_ptr(), positions.data_ptr(), int(exact), 1.0 / lp_temperature,
        thr.data_ptr() if lp_cut and thr is not None else 0, tokens.data_ptr(), logp.data_ptr())
    return tokens, logp


_sample_fused_op = torch.library.custom_op("rlhf_fast::sample_fused", _sample_fused_native, mutates_args=())
_sample_fused_op.register_fake(lambda logits, *args: (logits.new_empty(logits.shape[:1], dtype=torch.int64),
                                                      logits.new_empty(logits.shape[:1], dtype=torch.float32)))


def inverse_cdf(logits: torch.Tensor, temperature: float, u: torch.Tensor,
                threshold: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V), uniforms u (B,) in [0, 1) -> tokens (B,) int64: the first token whose CDF passes u, under
    softmax(logits / temperature) cut below `threshold` (B,) (`ops.support_threshold` at this temperature).

    The scaled logits are computed as the log-prob ops compute z, so the support sampled from is exactly the one
    `ops.token_logprobs` renormalises over.
    """
    scaled = logits.float() * (1.0 / temperature) if temperature != 1.0 else logits.float()  # x * 1 == x exactly
    if threshold is not None:
        scaled = scaled.masked_fill(scaled < threshold.to(scaled.dtype)[:, None], float("-inf"))
    if scaled.device.type == "cpu" and _native.has("sample_rows_cpu"):
        return _opaque(_sample_rows_op, _sample_rows_native)(scaled, u.float())
    weights = (scaled - scaled.max(dim=-1, keepdim=True).values).exp()  # (B, V) unnormalised probabilities
    cdf = weights.cumsum(dim=-1)  # (B, V); cdf[:, -1] is the normaliser
    scaled_u = (u * cdf[:, -1])[:, None]  # (B, 1), scaled into [0, total)
    # first index with cdf > u: token i has cdf[i] > u >= cdf[i - 1], so w_i > 0 (dropped tokens, w = 0, never win)
    return torch.searchsorted(cdf, scaled_u, right=True)[:, 0].clamp_max(scaled.shape[-1] - 1)


def _opaque(op, fn):
    """Inside torch.compile the custom op `op` (opaque to the tracer, so a compiled step runs the eager kernels);
    eagerly its plain function `fn` (no dispatcher cost)."""
    return op if torch.compiler.is_compiling() else fn


def _support_threshold(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """`ops.support_threshold` (its selection kernel: native or Triton)."""
    return ops.support_threshold(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    threshold: torch.Tensor | None) -> torch.Tensor:
    """`ops.token_logprobs` of the drawn tokens, the trainer's op (so a deterministic trainer recomputes them
    bitwise): the support replayed from `threshold`, or the full distribution (None)."""
    if threshold is None:
        return ops.token_logprobs(logits, tokens, temperature=temperature)
    return ops.token_logprobs(logits, tokens, temperature=temperature, top_k=top_k, top_p=top_p, support="replay",
                              support_threshold=threshold)


def _float_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


_support_threshold_op = torch.library.custom_op("rlhf_fast::sample_support_threshold", _support_threshold,
                                                mutates_args=())
_support_threshold_op.register_fake(lambda logits, *args: logits.new_empty(logits.shape[:-1],
                                                                           dtype=_float_dtype(logits)))
_token_logprobs_op = torch.library.custom_op("rlhf_fast::sample_logprobs", _token_logprobs, mutates_args=())
_token_logprobs_op.register_fake(lambda logits, tokens, *args: logits.new_empty(tokens.shape,
                                                                                dtype=_float_dtype(logits)))


def _sample_rows_native(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """csrc/sampling.cpp: the same inverse CDF, each row's max / weights / scan in one pass over it in cache.
    scaled (B, V) float32 CPU (the cut scaled logits), u (B,) float32 -> tokens (B,) int64."""
    if scaled.stride(-1) != 1 or scaled.stride(0) < scaled.shape[1]:  # (an expanded row: stride 0)
        scaled = scaled.contiguous()
    out = torch.empty(scaled.shape[0], dtype=torch.int64)
    _native.fn("sample_rows_cpu")(scaled.data_ptr(), scaled.shape[0], scaled.shape[1], scaled.stride(0),
                                  u.contiguous().data_ptr(), out.data_ptr())
    return out


_sample_rows_op = torch.library.custom_op("rlhf_fast::sample_rows", _sample_rows_native, mutates_args=())
_sample_rows_op.register_fake(lambda scaled, u: scaled.new_empty(scaled.shape[:1], dtype=torch.int64))


def replay_threshold(logits: torch.Tensor, temperature: float, thr: torch.Tensor) -> torch.Tensor:
    """The threshold a trainer replays, (...,): halfway between the support's smallest scaled logit (`thr`, a value of
    the row) and the largest one below it. It selects the same tokens on these logits, and the same ones on a
    trainer's logits that differ by rounding (the exact `thr` would drop the boundary token whenever the trainer's
    copy of it comes out an ulp lower)."""
    z = logits.float() * (1.0 / temperature)  # (..., V), as the ops compute z
    below = torch.where(z < thr[..., None], z, float("-inf")).amax(-1)  # (...,)
    mid = (thr + below) * 0.5
    return torch.where(torch.isfinite(below) & (mid > below), mid, thr)

