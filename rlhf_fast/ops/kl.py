"""`kl_penalty`: per-token KL estimators k1, k2, k3 and abs, with Triton forward/backward.

The log ratio lr = logp - ref_logp is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20] first, so
exp(+-lr) can neither overflow nor produce NaN gradients; the gradient is 0 where the clamp is active.

Non-finite inputs, the same on every backend: a NaN log ratio (a NaN input, or both inputs the same infinity)
gives NaN out with zero gradient; an infinite log ratio (one infinite input) is clamped to +-20 like any |lr| > 20.
The losses that use a KL drop such tokens and count them (`stats.nonfinite`).
"""
from __future__ import annotations

import torch

from rlhf_fast import backend
from rlhf_fast.kernels.loss_layout import LOG_RATIO_CLAMP  # noqa: F401 (re-exported)
from rlhf_fast.ops import _checks
from rlhf_fast.ops import reference as ref
from rlhf_fast.ops.loss_spec import KL_KINDS
backend.register_op("kl_penalty", triton=True)


class _KLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind):
        from rlhf_fast.kernels import ppo_losses as kp

        logp_c, ref_c = logp.contiguous(), ref_logp.contiguous()
        out = torch.empty(logp.shape, dtype=torch.promote_types(logp.dtype, ref_logp.dtype), device=logp.device)
        kp.kl_forward(logp_c, ref_c, out, kind)
        ctx.save_for_backward(logp_c, ref_c)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from rlhf_fast.kernels import ppo_losses as kp

        logp, ref_logp = ctx.saved_tensors
        dlr = torch.empty(logp.shape, dtype=torch.float32 if logp.dtype != torch.float64 else torch.float64,
                          device=logp.device)
        kp.kl_backward(logp, ref_logp, grad_out.contiguous(), dlr, ctx.kind)
        g_logp = dlr.to(logp.dtype) if ctx.needs_input_grad[0] else None
        g_ref = (-dlr).to(ref_logp.dtype) if ctx.needs_input_grad[1] else None
        return g_logp, g_ref, None


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    logp, ref_logp: same shape (any), float dtypes. With lr = clamp(logp - ref_logp, -20, 20):
      k1 = lr,  k2 = lr^2 / 2,  k3 = exp(-lr) + lr - 1 (computed as expm1(-lr) + lr),  abs = |lr|.
    Returns a tensor of the same shape (dtype: the promotion of the inputs'); differentiable in both inputs.
    NaN log ratio -> NaN (zero gradient); infinite log ratio -> clamped to +-20 (zero gradient), on every backend.
    """
    _checks.check_float("logp", logp)
    _checks.check_float("ref_logp", ref_logp)
    _checks.check_same_shape(("logp", "ref_logp"), (logp, ref_logp))
    _checks.check_same_device(("logp", "ref_logp"), (logp, ref_logp))
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if backend.select("kl_penalty", logp.device) == "triton" and logp.numel():
        return _KLTriton.apply(logp, ref_logp, kind)
    return ref.kl_penalty(logp, ref_logp, kind)
