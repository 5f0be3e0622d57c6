"""Analytic rooflines: the bytes each kernel must move and the FLOPs it must do, as a function of its shape, and
the peaks of the devices we run on, so a benchmark's fraction of peak is computed, never guessed.

A `Roofline(bytes, flops)` counts the compulsory traffic (every input read once, every output written once, per
pass) and the model FLOPs (what the maths needs, not what an implementation recomputes). Peaks are spec-sheet
numbers (dense, no sparsity), keyed by the name `torch.cuda.get_device_name()` reports; `memcpy_gbs` measures what
a plain device-to-device copy reaches on this device, printed beside the spec HBM figure.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch


@dataclasses.dataclass(frozen=True)
class Roofline:
    bytes: float  # compulsory HBM traffic of one call
    flops: float = 0.0  # model FLOPs of one call


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str  # our label, e.g. "H100 SXM"
    hbm_gbs: float  # HBM bandwidth, GB/s (1e9 bytes/s)
    bf16_tflops: float  # dense bf16/fp16 tensor-core TFLOP/s
    tf32_tflops: float  # dense tf32 tensor-core TFLOP/s
    fp32_tflops: float  # fp32 CUDA-core (non-tensor) TFLOP/s


# (substrings that must all occur in the lower-cased device name, peak); the first match wins, so the specific
# variants come before the family default. Sources: NVIDIA H100 / H200 / A100 datasheets, dense figures.
PEAKS: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    (("h200", "nvl"), DevicePeak("H200 NVL", 4800.0, 835.0, 417.5, 60.0)),
    (("h200",), DevicePeak("H200", 4800.0, 989.4, 494.7, 66.9)),
    (("h100", "pcie"), DevicePeak("H100 PCIe", 2000.0, 756.0, 378.0, 51.2)),
    (("h100", "nvl"), DevicePeak("H100 NVL", 3900.0, 835.0, 417.5, 60.0)),
    (("h100",), DevicePeak("H100 SXM", 3350.0, 989.4, 494.7, 66.9)),  # "NVIDIA H100 80GB HBM3"
    (("a100", "pcie", "40gb"), DevicePeak("A100 PCIe 40GB", 1555.0, 312.0, 156.0, 19.5)),
    (("a100", "pcie"), DevicePeak("A100 PCIe 80GB", 1935.0, 312.0, 156.0, 19.5)),
    (("a100", "40gb"), DevicePeak("A100 SXM 40GB", 1555.0, 312.0, 156.0, 19.5)),
    (("a100",), DevicePeak("A100 SXM 80GB", 2039.0, 312.0, 156.0, 19.5)),
)


def peak_for(device_name: str) -> DevicePeak | None:
    """The spec peak of a device by its reported name, or None for a device not in the table (CPUs included)."""
    low = device_name.lower()
    for keys, peak in PEAKS:
        if all(k in low for k in keys):
            return peak
    return None


def matmul_peak_tflops(peak: DevicePeak, dtype: str | None) -> float:
    """The dense peak that applies to a matmul in `dtype` ("bfloat16", "float16", "float32", ...)."""
    if dtype in ("bfloat16", "float16"):
        return peak.bf16_tflops
    if dtype == "tf32":
        return peak.tf32_tflops
    return peak.fp32_tflops


@functools.cache
def memcpy_gbs(device: str = "cuda", nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured bandwidth of `dst.copy_(src)` on `device` (read + write counted), GB/s; median of `repeats`."""
    dev = torch.device(device)
    if dev.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize(dev)
            times.append(a.elapsed_time(b) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    return round(2 * nbytes / times[len(times) // 2] / 1e9, 1)


def fractions(device_name: str, gb_per_s: float | None, tflop_per_s: float | None, dtype: str | None,
              memcpy: float | None = None) -> dict:
    """Row columns: fraction of spec HBM bandwidth, of the measured memcpy bandwidth and of the dense matmul peak
    for `dtype`. Empty for a device not in `PEAKS` (no guessed peaks)."""
    out: dict = {}
    peak = peak_for(device_name)
    if gb_per_s is not None:
        if peak is not None:
            out["hbm_fraction"] = round(gb_per_s / peak.hbm_gbs, 3)
        if memcpy:
            out["memcpy_fraction"] = round(gb_per_s / memcpy, 3)
    if tflop_per_s is not None and peak is not None:
        out["matmul_peak_fraction"] = round(tflop_per_s / matmul_peak_tflops(peak, dtype), 3)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-kernel rooflines. `elem`: bytes per element of the float inputs; index tensors are int64 unless stated.
# ---------------------------------------------------------------------------------------------------------------

def token_logprobs(n: int, vocab: int, elem: int, *, backward: bool = False) -> Roofline:
    """(n, vocab) logits -> (n,) fp32 log-probs (+ lse and entropy saved for backward).
    Forward reads the logits and labels once and writes 3 fp32 per row; the backward reads the logits again, the
    saved rows and the upstream grads and writes dlogits. FLOPs: ~4 per logit (max, exp, sum, entropy) per pass."""
    fwd = n * vocab * elem + 8 * n + 12 * n
    if not backward:
        return Roofline(fwd, 4.0 * n * vocab)
    bwd = 2 * n * vocab * elem + 8 * n + 16 * n
    return Roofline(fwd + bwd, 8.0 * n * vocab)


def linear_logprobs(n: int, hidden: int, vocab: int, elem: int, *, backward: bool = True) -> Roofline:
    """hidden (n, H) @ weight (V, H)^T -> log-probs, never materialising the logits. Model FLOPs: 2nHV forward,
    4nHV backward (dhidden and dweight); bytes: hidden and weight read, their gradients written."""
    fwd = (n * hidden + vocab * hidden) * elem + 8 * n + 12 * n
    if not backward:
        return Roofline(fwd, 2.0 * n * hidden * vocab)
    return Roofline(fwd + (n * hidden + vocab * hidden) * elem, 6.0 * n * hidden * vocab)


def fused_ppo(n: int, hidden: int, vocab: int, elem: int) -> Roofline:
    """The fused PPO step (forward + backward from hidden states): the linear log-prob's matmuls (6nHV) plus 5
    fp32 per-token inputs (old_logp, advantages, ref_logp, weights) and the labels."""
    base = linear_logprobs(n, hidden, vocab, elem)
    return Roofline(base.bytes + n * (4 * 4 + 8), base.flops)


def gae(tokens: int, *, whiten: bool = False, elem: int = 4) -> Roofline:
    """Padded GAE: reads rewards, values (elem each) and the uint8 mask, writes advantages and returns. Whitening
    (a second pass) reads the advantages and mask again and writes the advantages. ~6 FLOPs per token per pass."""
    scan = tokens * (4 * elem + 1)
    if not whiten:
        return Roofline(scan, 6.0 * tokens)
    return Roofline(scan + tokens * (2 * elem + 1), 10.0 * tokens)


def paged_decode(batch: int, heads: int, kv_heads: int, head_dim: int, ctx: int, elem: int) -> Roofline:
    """One decode step of paged attention: each row reads its ctx keys and values per kv head once (GQA shares
    them across heads/kv_heads query heads), its query and writes its output; int32 tables and lengths are
    negligible. FLOPs: q.k and p.v, 2 each per (head, key, dim)."""
    kv = 2 * batch * ctx * kv_heads * head_dim * elem
    qo = 2 * batch * heads * head_dim * elem
    return Roofline(kv + qo, 4.0 * batch * heads * ctx * head_dim)


def policy_loss(tokens: int, elem: int) -> Roofline:
    """ppo_policy_loss forward + backward: logp, old_logp, advantages (elem) and the mask read twice, dlogp written."""
    return Roofline(tokens * (2 * (3 * elem + 1) + elem), 20.0 * tokens)


def value_loss(tokens: int, elem: int) -> Roofline:
    """value_loss forward + backward: values, old values, returns and the mask read twice, dvalues written."""
    return Roofline(tokens * (2 * (3 * elem + 1) + elem), 14.0 * tokens)
