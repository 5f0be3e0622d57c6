"""Generalized advantage estimation as one reverse-time scan: `gae` (padded) and `gae_packed` (cu_seqlens).

Backends: Triton (one program per sequence, a parallel scan over affine maps per chunk, optional fused
whitening: 2 launches in all), native CPU C++ (two sequences interleaved per thread, OpenMP over the pairs) and
CUDA C++ (one block per sequence, a chunked block scan), both sharing csrc/gae_impl.h, and the reference reversed
loop (rlhf_fast.ops.reference).

Definition (Schulman et al. 2016, eq. 16, with the multi-turn masking of verl): for a valid t whose next valid
position is n (if none, V_n = A_n = 0),
    delta_t = r_t + gamma * V_n - V_t,        A_t = delta_t + gamma * lam * A_n.
A masked t (padding, or an observation token inside a multi-turn response) is transparent: it adds no TD error,
is skipped when bootstrapping (the next *valid* value is used across holes) and carries the advantage over,
A_t = A_{t+1} (0 after the last valid token). returns = advantages + values at every position.
No gradient: GAE runs under no_grad semantics (outputs never require grad).

Non-finite inputs (the same on every backend): a NaN/Inf reward or value at a valid token makes that token's
advantage non-finite and, through the recursion, every earlier valid token's of the same sequence (masked tokens
are never read). Nothing crosses sequences. With `whiten=True` the whitening statistics leave the non-finite
advantages out and those stay non-finite, so the rest of the batch is whitened as if they were masked and the
policy loss later drops and counts them (`stats.nonfinite`); find them with `~torch.isfinite(advantages) & mask`.
"""
from __future__ import annotations

import numbers

import torch

from rlhf_fast import _native, backend
from rlhf_fast._native import arg
from rlhf_fast.ops import _checks
from rlhf_fast.ops import reference as ref
from rlhf_fast.ops.stats import whiten_torch

backend.register_op("gae", triton=True, native_cpu="gae_cpu", native_cuda="gae_cuda")


def _call_native(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
                 advantages: torch.Tensor, returns: torch.Tensor, gamma: float, lam: float) -> None:
    """Native scan into `advantages`, `returns`: rewards, values, outputs (total,) contiguous, one float dtype;
    mask (total,) uint8; cu_seqlens (num_seqs + 1,) int64 on the same device."""
    dt = values.dtype
    _native.call("gae_cuda" if rewards.is_cuda else "gae_cpu", arg("rewards", rewards, dt), arg("values", values),
                 arg("mask", mask, torch.uint8), arg("cu_seqlens", cu_seqlens, torch.int64), cu_seqlens.numel() - 1,
                 arg("advantages", advantages, dt), arg("returns", returns, dt), _native.dtype_code(values),
                 float(gamma), float(lam))


@torch.library.custom_op("rlhf_fast::gae_scan", mutates_args=("advantages", "returns"))
def gae_native(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
               advantages: torch.Tensor, returns: torch.Tensor, gamma: float, lam: float) -> None:
    """`_call_native` as a custom op (what torch.compile and CUDA code see)."""
    _call_native(rewards, values, mask, cu_seqlens, advantages, returns, gamma, lam)


@gae_native.register_fake
def _(rewards, values, mask, cu_seqlens, advantages, returns, gamma, lam) -> None:
    return None


def _check_coef(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1], got {x!r}")


def _common_dtype(rewards: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    return torch.promote_types(rewards.dtype, values.dtype)


def _pad_index(cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_seqs, max_len) flat indices of each sequence's tokens (right padded) and the in-sequence mask."""
    pos = torch.arange(max_len, device=cu.device)
    inside = pos < (cu[1:] - cu[:-1])[:, None]
    return torch.where(inside, cu[:-1, None] + pos, 0), inside


def _scan(r, v, m, cu, gamma, lam, whiten, max_len, padded=False):
    """Dispatch on flat (total,) inputs with offsets cu (num_seqs + 1,) int64; returns flat (adv, ret).

    `padded`: every sequence has length max_len (the torch path then needs no gather)."""
    use = backend.select("gae", v.device)
    m8 = m.contiguous().view(torch.uint8) if m.dtype == torch.bool else m.ne(0).contiguous().view(torch.uint8)
    adv, ret = torch.empty_like(v), torch.empty_like(v)
    if use == "triton":
        from rlhf_fast.kernels import gae as kg

        kg.gae_scan(r, v, m8, cu, adv, ret, gamma, lam, max_len=max_len, whiten=whiten)
        return adv, ret
    if use == "native":
        if v.is_cuda or torch.compiler.is_compiling():
            gae_native(r, v, m8, cu, adv, ret, float(gamma), float(lam))
        else:  # eager CPU: the custom op's dispatch alone cost ~45 us, 10-15% of a 64 x 2048 call
            _call_native(r, v, m8, cu, adv, ret, gamma, lam)
    elif padded and v.numel():
        a_, r_ = ref.gae(r.view(-1, max_len), v.view(-1, max_len), m8.view(-1, max_len).bool(), gamma=gamma, lam=lam)
        adv, ret = a_.view(-1), r_.view(-1)
    elif v.numel():  # the reference loop on a right-padded (num_seqs, max_len) view; padding is masked out
        idx, inside = _pad_index(cu, max_len)
        a_, r_ = ref.gae(r[idx], v[idx], m8[idx].bool() & inside, gamma=gamma, lam=lam)
        adv[idx[inside]], ret[idx[inside]] = a_[inside], r_[inside]
    if whiten:
        adv = whiten_torch(adv, m8.bool())
    return adv, ret


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, whiten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of padded sequences (left or right padding, holes allowed), see the module docstring.

    rewards, values, mask: (batch, T); mask 0/1. gamma, lam in [0, 1]. `whiten=True` whitens the advantages over
    the mask (as `masked_whiten`, fused into the scan's second launch on Triton); returns use the raw advantages.
    Returns (advantages, returns), each (batch, T) in the promoted dtype of rewards and values.
    """
    for n, t in (("rewards", rewards), ("values", values)):
        _checks.check_float(n, t, ndim=2)
    _checks.check_same_shape(("values", "rewards"), (values, rewards))
    _checks.check_mask("mask", mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the same shape as values {tuple(values.shape)}; got {_checks.desc(mask)}")
    _checks.check_same_device(("values", "rewards", "mask"), (values, rewards, mask))
    _check_coef("gamma", gamma)
    _check_coef("lam", lam)
    b, t = values.shape
    dt = _common_dtype(rewards, values)
    # (batch + 1,) row offsets in one launch (GPU total with whiten=True: this, the scan, the normalisation)
    cu = torch.arange(0, (b + 1) * t, t, device=values.device, dtype=torch.int64) if t else \
        torch.zeros(b + 1, device=values.device, dtype=torch.int64)
    with torch.no_grad():
        adv, ret = _scan(rewards.detach().to(dt).contiguous().view(-1), values.detach().to(dt).contiguous().view(-1),
                         mask.reshape(-1), cu, gamma, lam, whiten, t, padded=True)
    return adv.view(b, t), ret.view(b, t)


def gae_packed(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, *,
               gamma: float = 1.0, lam: float = 0.95, whiten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae` on packed 1-D streams: rewards, values, mask (total,); sequence i is [cu_seqlens[i], cu_seqlens[i+1]).

    cu_seqlens: (num_seqs + 1,) int32/int64, starting at 0, non-decreasing, ending at total. Returns (total,) x 2.
    """
    for n, t in (("rewards", rewards), ("values", values)):
        _checks.check_float(n, t, ndim=1)
    _checks.check_same_shape(("values", "rewards"), (values, rewards))
    _checks.check_mask("mask", mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the same shape as values {tuple(values.shape)}; got {_checks.desc(mask)}")
    _checks.check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
    _checks.check_same_device(("values", "rewards", "mask", "cu_seqlens"), (values, rewards, mask, cu_seqlens))
    if cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != values.numel() \
            or bool((cu_seqlens.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at total={values.numel()}; "
                         f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
    _check_coef("gamma", gamma)
    _check_coef("lam", lam)
    dt = _common_dtype(rewards, values)
    max_len = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    with torch.no_grad():
        return _scan(rewards.detach().to(dt).contiguous(), values.detach().to(dt).contiguous(), mask,
                     cu_seqlens.to(torch.int64).contiguous(), gamma, lam, whiten, max_len)
