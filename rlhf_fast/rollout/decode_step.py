"""One decode step as one function over fixed-size inputs (forward + sampler), compiled once per batch bucket.

gpt-fast's `decode_one_token` and nano-vllm's `capture_cudagraph` in one idea: the running batch is padded to a bucket
(1, 2, 4, 8, ... rows; `bucket`), so a compiled step sees a few fixed shapes and is reused by every batch size in its
bucket, never recompiled per batch size. Padding rows repeat row 0's inputs with slot -1 (they write no K/V, read
row 0's, and their draws are dropped). The step's inputs are the `DecodeBatch` rows (one int32 buffer), the KV cache
and the seed; its output is one (3, rows) float64 tensor (tokens, log-probs, replay thresholds), one device-to-host
copy.

Backends, when compiled (`torch.compile(fullgraph=True, dynamic=False)`):
  * default mode: inductor; on CUDA with CUDA graphs (inductor's `triton.cudagraphs`, i.e. mode="reduce-overhead").
    Inductor fuses the elementwise work and may round it differently from eager, so log-probs agree to float
    rounding and tokens agree except at a CDF boundary within rounding.
  * deterministic mode: dynamo's "eager" backend: the captured graph runs eager's kernels, so a compiled step is
    bitwise the eager one, as deterministic mode promises; no CUDA graphs (the backends that capture them
    functionalize the graph first, which copies the whole KV cache at every in-place store: 40x slower on CPU).
Prefill stays eager (variable length).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from rlhf_fast.rollout import block_table
from rlhf_fast.rollout.block_table import DecodeBatch, StepInputs
from rlhf_fast.rollout.sampling import sample
from rlhf_fast.rollout.types import SamplingParams

RECOMPILE_LIMIT = 64  # graphs one step may hold: buckets x table widths x sampling settings


def bucket(n: int) -> int:
    """The smallest power of two >= n (n >= 1): the rows a compiled step runs for n sequences."""
    return 1 << max(0, n - 1).bit_length()


class DecodeStep:
    """forward(inputs: StepInputs, kv) -> logits (B, V): the model call. compile: run under torch.compile.

    `compilations` counts the graphs compiled so far and `compile_seconds` the wall time of the calls that compiled
    (tracing, compiling and the first run)."""

    def __init__(self, forward: Callable[[StepInputs, torch.Tensor], torch.Tensor], *, deterministic: bool,
                 compile: bool = False):
        self.forward = forward
        self.deterministic = deterministic
        self.compiled = compile
        self.compilations = 0
        self.compile_seconds = 0.0
        self.onednn_direct_calls = 0  # oneDNN linears the compiled graphs call directly (`_onednn_calls_direct`)
        self._fn = self._step
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
            self._fn = torch.compile(self._step, fullgraph=True, dynamic=False, backend=self._backend)

    def rows_for(self, n: int) -> int:
        """The padded row count of a step over n sequences."""
        return bucket(n) if self.compiled else n

    def __call__(self, rows: torch.Tensor, kv: torch.Tensor, key: torch.Tensor,
                 params: SamplingParams) -> torch.Tensor:
        """rows (B, DecodeBatch.TABLE + max_blocks) int32 (B = rows_for(sequences)), kv the cache, key (2,) the seed
        -> (3, B) float64: the sampled tokens, their log-probs and replay thresholds (`sampling.Draw`)."""
        if not self.compiled:
            return self._fn(rows, kv, key, params)
        if kv.is_cuda:
            torch._dynamo.mark_static_address(kv)  # the cache is written in place: never copied into the graph
        before, t0 = self.compilations, time.perf_counter()
        out = self._fn(rows, kv, key, params)
        if self.compilations != before:
            self.compile_seconds += time.perf_counter() - t0
        return out

    def _step(self, rows: torch.Tensor, kv: torch.Tensor, key: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        inputs = block_table.decode_inputs(rows, deterministic=self.deterministic)
        logits = self.forward(inputs, kv)  # (B, V)
        draw = sample(logits, params, key, rows[:, DecodeBatch.STREAM], rows[:, DecodeBatch.POS],
                      exact=self.deterministic)
        return torch.stack([t.double() for t in draw])  # (3, B)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs):
        self.compilations += 1
        if self.deterministic:  # the captured graph as it is: eager's kernels (bitwise the eager step)
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        with _onednn_calls_direct(gm) as direct:
            self.onednn_direct_calls += direct
            patches = {"triton.cudagraphs": cuda}
            if direct:  # its post-grad fusions (linear + add / unary) would lower to the frozen-weight path again
                patches["pattern_matcher"] = False
            return compile_fx(gm, example_inputs, config_patches=patches)


@contextlib.contextmanager
def _onednn_calls_direct(gm: torch.fx.GraphModule):
    """The step's oneDNN linears (`ops._onednn`'s custom op, opaque to the tracer) called in the compiled code as
    `torch.ops.mkldnn._linear_pointwise` itself: the custom op's Python dispatch cost ~15 us a call, 17 calls a step
    on a 4-layer model. Inductor's lowering of that op handles only weights it froze itself, so it is set aside
    while this graph compiles (inductor then calls the op as an extern kernel) and restored after."""
    from torch._inductor import lowering

    from rlhf_fast.ops import _onednn

    direct = torch.ops.mkldnn._linear_pointwise.default if _onednn.available() else None
    found = 0
    for node in gm.graph.nodes:
        if direct is not None and node.op == "call_function" and node.target is _onednn.OP:
            x, w, b = (list(node.args) + [node.kwargs.get("bias")])[:3]
            node.target, node.args, node.kwargs = direct, (x, w, b, "none", [], ""), {}
            found += 1
    if not found:
        yield 0
        return
    gm.recompile()
    saved = lowering.lowerings.pop(direct, None)
    try:
        yield found
    finally:
        if saved is not None:
            lowering.lowerings[direct] = saved
