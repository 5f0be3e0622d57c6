"""The support a rollout samples from under top-k / top-p, as one threshold per row: `support_threshold`.

Semantics (as vLLM's and Hugging Face's samplers: temperature first, then top-k, then top-p), in units of
z = soft_cap(logits) * (1 / temperature) (`softcap` > 0: the final logit soft-cap c tanh(x / c) of Gemma 2/3, before
the temperature; 0: z = logits / temperature):
  * top-k (0 or >= V: off): thr_k = the k-th largest z of the row; every token tied with it is kept.
  * top-p (1.0: off): over the tokens top-k kept, with p their softmax, thr = the largest value t among them with
    mass(z >= t) >= top_p: the smallest nucleus whose probability reaches top_p, the token that crosses it (and its
    ties) included.
  * thr = max(thr_k, thr_p); a token is in the support iff z >= thr. -inf: nothing is cut.
The log-prob ops keep the label as well (so a log-prob is never -inf; see `token_logprobs`).

Backends (the selection pass): triton (`rlhf_fast.kernels.support`, one program per row, 32 bisection steps on the
bits of z over the row's vocabulary tiles), native (csrc/logprobs.cpp `support_threshold_cpu`: the same bisection,
one row in cache per thread, OpenMP over rows), torch (`torch.topk` for top-k, a sort + cumsum of the kept tokens
for top-p; the result is the same value of the row up to fp32 summation order at the top-p boundary).
The float64 oracle is `reference.support_threshold` (a plain sort + cumsum).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch

from rlhf_fast import _native
from rlhf_fast.backend import register_op, select
from rlhf_fast.ops import _checks
from rlhf_fast.ops._linear_chunked import _compute_dtype, torch_z

register_op("support_threshold", triton=True, native_cpu="support_threshold_cpu")

SUPPORT_MODES = ("recompute", "replay")


def truncated(vocab: int, top_k: int, top_p: float) -> bool:
    """Whether top-k / top-p cut anything off a vocabulary of `vocab` tokens."""
    return 0 < top_k < vocab or top_p < 1.0


def torch_thresholds(logits: torch.Tensor, inv_temp: float, top_k: int, top_p: float,
                     softcap: float = 0.0) -> torch.Tensor:
    """logits (R, V) -> thr (R,) in the compute dtype (PyTorch; chunk-sized temporaries)."""
    z = torch_z(logits, inv_temp, softcap, _compute_dtype(logits))  # (R, V), the row kernels' z
    r, v = z.shape
    thr = torch.full((r,), float("-inf"), dtype=z.dtype, device=z.device)
    top = None
    if 0 < top_k < v:
        top = z.topk(top_k, dim=-1).values  # (R, k) descending
        thr = top[:, -1]
    if top_p < 1.0 and r:
        if top is None:
            top = z.sort(-1, descending=True).values  # (R, V)
        mx = top[:, :1].clamp_min(torch.finfo(z.dtype).min)  # (R, 1), finite for an all -inf row
        # the kept mass counts every tie of thr_k, also those past the k-th place
        total = torch.where(z >= thr.unsqueeze(-1), (z - mx).exp(), torch.zeros_like(z)).sum(-1, keepdim=True)
        csum = (top - mx).exp().cumsum(-1)  # (R, K)
        first = (csum < top_p * total).sum(-1, keepdim=True).clamp_max(top.shape[-1] - 1)  # (R, 1)
        thr = torch.maximum(thr, top.gather(-1, first).squeeze(-1))  # past the k-th place: thr_k itself
    return thr


def native_thresholds(logits: torch.Tensor, inv_temp: float, top_k: int, top_p: float,
                      softcap: float = 0.0) -> torch.Tensor:
    """csrc/logprobs.cpp `support_threshold_cpu` on contiguous logits (R, V) -> thr (R,) in the compute dtype."""
    n, v = logits.shape
    cd = _compute_dtype(logits)
    thr = torch.empty(n, dtype=cd, device=logits.device)
    _native.call("support_threshold_cpu", _native.arg("logits", logits, code=True), n, v, float(inv_temp),
                 float(softcap), int(top_k), float(top_p), _native.arg("thr", thr, cd))
    return thr


def triton_thresholds(logits: torch.Tensor, inv_temp: float, top_k: int, top_p: float,
                      softcap: float = 0.0) -> torch.Tensor:
    """rlhf_fast.kernels.support on logits (R, V) (fp32/bf16/fp16) -> thr (R,) fp32."""
    from rlhf_fast.kernels.support import support_threshold as launch

    thr = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    launch(logits, inv_temp, top_k, top_p, thr, softcap)
    return thr


def row_thresholds(logits: torch.Tensor, inv_temp: float, top_k: int, top_p: float, backend: str,
                   softcap: float = 0.0) -> torch.Tensor:
    """logits (R, V) (rows contiguous) -> thr (R,) in the compute dtype, on `backend` (fp64 logits: never Triton);
    in units of z = soft_cap(logits) * inv_temp, each backend's z as its row kernels compute it."""
    if backend == "native" and logits.device.type == "cpu":
        return native_thresholds(logits.contiguous(), inv_temp, top_k, top_p, softcap)
    if backend == "triton" and logits.dtype != torch.float64:
        return triton_thresholds(logits.contiguous(), inv_temp, top_k, top_p, softcap)
    return torch_thresholds(logits, inv_temp, top_k, top_p, softcap)


def check_support(top_k, top_p, support: str, threshold: torch.Tensor | None, lead: torch.Size,
                  device: torch.device) -> None:
    """top_k int >= 0, top_p in (0, 1], support a mode; `threshold` (lead) float on `device` iff support="replay"."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (1: off), got {top_p!r}")
    if support not in SUPPORT_MODES:
        raise ValueError(f"support must be one of {SUPPORT_MODES}, got {support!r}")
    if (support == "replay") != (threshold is not None):
        raise ValueError('support="replay" takes support_threshold (the rollout\'s recorded threshold per token) and '
                         'support="recompute" takes none')
    if threshold is not None:
        _checks.check_float("support_threshold", threshold)
        if threshold.shape != lead:
            raise ValueError(f"support_threshold must have shape {tuple(lead)} (the labels'); "
                             f"got {_checks.desc(threshold)}")
        if threshold.device != device:
            raise ValueError(f"support_threshold must be on {device}; got {_checks.desc(threshold)}")


def check_softcap(softcap) -> None:
    """The final logit soft-cap: a finite number >= 0 (0: off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off; c > 0 maps the logits to c * tanh(logits / "
                         f"c)), got {softcap!r}")


def support_threshold(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      softcap: float = 0.0) -> torch.Tensor:
    """The threshold of the support sampled from, per row: token i is in it iff z[i] >= thr, with
    z = soft_cap(logits) / temperature.

    What a rollout engine records per sampled token, for `token_logprobs(..., support="replay")`. Exact: thr is a
    value of the row (z = soft_cap(logits) * (1 / temperature) in the compute dtype), found by a selection pass (see
    the module docstring for the semantics).

    Args:
        logits: (..., V) float32/bfloat16/float16/float64.
        temperature: > 0, the sampling temperature.
        top_k: keep the k largest (and their ties); 0 (or >= V) turns it off.
        top_p: keep the smallest nucleus reaching this mass (within the top-k); 1.0 turns it off.
        softcap: the final logit soft-cap c (z = c * tanh(logits / c) / temperature); 0: off.
    Returns:
        thr (...) float32 (float64 for float64 logits), in z units; -inf where nothing is cut.
    """
    _checks.check_float("logits", logits, min_ndim=1)
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    check_support(top_k, top_p, "recompute", None, logits.shape[:-1], logits.device)
    check_softcap(softcap)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if not truncated(vocab, top_k, top_p):
        return torch.full(lead, float("-inf"), dtype=_compute_dtype(logits), device=logits.device)
    backend = select("support_threshold", logits.device)
    with torch.no_grad():
        thr = row_thresholds(logits.detach().reshape(-1, vocab), 1.0 / temperature, top_k, top_p, backend, softcap)
    return thr.reshape(lead)


class ChunkSupport(NamedTuple):
    """Thresholds for the chunked from-hidden paths: `(logits (R, V), rows slice) -> thr (R,) | None`."""

    thr: torch.Tensor | None  # (M,) replayed thresholds of the call's rows, in the compute dtype
    pick: Callable[[torch.Tensor], torch.Tensor] | None  # logits (R, V) -> thr (R,), recomputed per chunk

    def __call__(self, logits: torch.Tensor, rows: slice) -> torch.Tensor | None:
        if self.pick is not None:
            return self.pick(logits)
        return None if self.thr is None else self.thr[rows]

    @classmethod
    def of(cls, vocab: int, inv_temp: float, top_k: int, top_p: float, thr: torch.Tensor | None,
           backend: str, softcap: float = 0.0) -> ChunkSupport:
        """Replay `thr` when given, else recompute where top-k / top-p cut something (on `backend`, from the chunk's
        logits soft-capped by `softcap`), else none."""
        if thr is not None or not truncated(vocab, top_k, top_p):
            return cls(thr, None)
        return cls(None, partial(row_thresholds, inv_temp=inv_temp, top_k=top_k, top_p=top_p, backend=backend,
                                 softcap=softcap))
