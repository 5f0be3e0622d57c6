"""Building blocks of the compact models: linear layers (optionally batch-invariant), norms, rotary, attention.

Tokens are packed: every tensor here is `(T, ...)` with T the tokens of all sequences of a step side by side.
Attention sees the KV cache only through `AttnMetadata` (slot mapping, block tables, context lengths).

Batch invariance (`deterministic=True`): a token's result must not depend on which other tokens share its step.
Matrix products are run on fixed-size row chunks (`ROW_CHUNK` rows, zero-padded), so every row is reduced by the same
GEMM kernel with the same blocking whatever the batch size; norms and softmaxes reduce each row on its own; attention
goes through the paged kernel one query at a time, keys in block-table order.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast import ops
from rlhf_fast.models import packed_weights
from rlhf_fast.ops import _onednn as onednn

ROW_CHUNK = 16  # rows per GEMM call in deterministic mode


@dataclasses.dataclass(frozen=True)
class AttnMetadata:
    """Where a step's tokens read and write K/V. Exactly one of `cu_seqlens` / `block_tables` is set.

    slot_mapping: (T,) int64, cache slot (block * block_size + offset) each token's K/V is written to; None = the
        step keeps no cache (teacher-forced scoring in the default mode).
    cu_seqlens: list of T-offsets of the packed sequences (prefill: causal attention within each sequence).
    block_tables: (T, max_blocks) int32, the block table each query reads (paged attention, one row per query).
    context_lens: (T,) int32, how many cached tokens each query attends to (itself included).
    """

    slot_mapping: torch.Tensor | None
    cu_seqlens: list[int] | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    deterministic: bool = False


class DecoderLM(nn.Module, abc.ABC):
    """A decoder-only language model over packed tokens that owns its parameters (or, converted by
    `models.from_hf`, shares a transformers model's leaf modules). A family supplies the blocks, `embed_inputs` and
    `final_norm`; `forward`, `logits` and `packed_head` are shared.

    Modules: `embed` (nn.Embedding), `layers` (nn.ModuleList of blocks, each called as a module:
    `block(h, ctx, attend, deterministic, rows)`), `norm` (the final norm, with `.weight`), `lm_head` (nn.Linear, or
    None for a bare backbone: a reward or value model). `config` is the Hugging Face config it was built from (for
    export and the context length), `args` the family's frozen args. `final_logit_softcap` c > 0: the logits are
    c tanh(z / c) of the lm_head's z (Gemma 2); `logits` applies it, and the training ops that read `lm_head`
    directly must be given it (`ops.linear_token_logprobs(softcap=)`).
    """

    final_logit_softcap: float = 0.0
    routed = False  # a mixture-of-experts model: its blocks take `routing=` (`moe.RoutingRecord`)

    def __init__(self, config, args):
        super().__init__()
        self.config = config
        self.args = args
        self.num_layers = args.num_layers
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.vocab_size = args.vocab_size
        self.max_context = args.max_context
        self.windows = list(args.windows)  # per layer: a query at position p sees keys at positions > p - W (0: all)
        self.kv_window = max(self.windows) if self.windows and min(self.windows) > 0 else 0  # 0: some layer reads all
        self.final_logit_softcap = float(getattr(args, "final_logit_softcap", 0.0) or 0.0)
        self.lm_head: nn.Linear | None = None
        self._packed_head: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @abc.abstractmethod
    def embed_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, object]:
        """(T,) ids and positions -> the embeddings (T, hidden) and what every block reads besides (rotary)."""

    @abc.abstractmethod
    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm on the last block's output (T, hidden)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend, deterministic: bool = False,
                out_rows: torch.Tensor | None = None, *, routing=None) -> torch.Tensor:
        """The decoder over packed tokens: input_ids, positions (T,) -> final-normed hidden (T, hidden).

        `attend(layer, q, k, v, scale, window=0, softcap=0.0, sinks=None) -> (T, H, D)` is the attention (rollout:
        the KV cache, `cache_attention`; training: `models.packed`); `window` W > 0: a query at position p sees keys
        at positions > p - W (a sliding-window layer); `softcap`, `sinks` (H,): as `ops.paged_attention`.
        Differentiable; the rollout calls it under no_grad. `deterministic`: batch-invariant (fixed-chunk GEMMs).
        `out_rows` (R,) int64: only these rows of the output are read (a value model's response rows, a reward
        model's last rows, the sampled rows of a prefill), so the last block computes the rest of its rows' keys and
        values only; returns (R, hidden), equal to the full output's rows (bitwise in deterministic mode).
        Every block is called as a module, so what `parallelize` wraps it in (FSDP2, checkpointing, compile) runs.
        `routing` (`moe.RoutingRecord`): a mixture-of-experts model (`routed`) records or replays each token's
        experts there (keyed by the T input tokens); other models ignore it."""
        h, ctx = self.embed_inputs(input_ids, positions)
        last = self.num_layers - 1
        kw = {"routing": routing} if routing is not None and self.routed else {}
        for i, block in enumerate(self.layers):
            rows = out_rows if i == last else None
            h = block(h, ctx, attend, deterministic, rows, **kw)
        if out_rows is not None and not self.num_layers:
            h = h.index_select(0, out_rows)
        return self.final_norm(h)

    def logits(self, h: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """Final hidden states (R, hidden) -> float32 logits (R, vocab) through `lm_head`, soft-capped to
        c tanh(z / c) when `final_logit_softcap` c > 0 (as transformers' Gemma 2 / 3: z / c, tanh, times c)."""
        head = self.lm_head
        if head is None:
            raise TypeError(f"{type(self).__name__} has no lm_head: it is a backbone, it gives hidden states only")
        if self._packed_head is not None and not deterministic:
            z = onednn.linear(h.float(), self._packed_head, head.bias)
        else:
            z = linear(h, head.weight, head.bias, deterministic).float()
        c = self.final_logit_softcap
        return torch.tanh(z / c) * c if c else z

    def save_pretrained(self, path, **kwargs) -> None:
        """Write this model as a Hugging Face directory (`state_dict_adapter.save_pretrained`: `tokenizer`, `dtype`,
        `max_shard_bytes`), which `transformers.AutoModelForCausalLM` (`AutoModel` for a backbone) loads."""
        from rlhf_fast.models.state_dict_adapter import save_pretrained

        save_pretrained(self, path, **kwargs)

    @contextlib.contextmanager
    def packed_head(self, rows_hint: int):
        """Within the block, `logits` (outside deterministic mode) multiplies by the lm_head weight reordered once
        for oneDNN (`ops._onednn`) for about `rows_hint` rows: a rollout's decode steps (a few dozen rows against the
        whole vocabulary) run about 2x faster than MKL's GEMM on the plain weight. CPU fp32 only; elsewhere, or
        with a sharded or missing head, nothing changes. The weight must not change inside the block."""
        head = self.lm_head
        self._packed_head = None if head is None else onednn.pack(head.weight, rows_hint)
        try:
            yield
        finally:
            self._packed_head = None


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale `weight` (hidden,), computed in fp32 (`rms_norm`)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
    """x (T, in) @ weight.T (in, out) + bias -> (T, out); batch-invariant in fixed row chunks when deterministic."""
    if not deterministic:
        return F.linear(x, weight, bias)
    t = x.shape[0]
    pad = -t % ROW_CHUNK
    xc = F.pad(x, (0, 0, 0, pad)).view(-1, ROW_CHUNK, x.shape[1])  # (chunks, ROW_CHUNK, in)
    y = torch.matmul(xc, weight.t()).view(-1, weight.shape[0])[:t]  # (T, out)
    return y + bias if bias is not None else y


def project(x: torch.Tensor, module: nn.Module, deterministic: bool) -> torch.Tensor:
    """`module`'s projection of x (T, in) -> (T, out), its parameters read at call time: an `nn.Linear`, GPT-2's
    `Conv1D` (a converted transformers model), our `LoRALinear` (`models.lora`: `weight`, `bias`, `lora_A`,
    `lora_B`, `scaling`, `dropout`, `disabled`), or a peft LoRA layer (a converted transformers + peft model). An
    active adapter adds what peft's own forward computes: W x + b + scale * B A dropout(x). Disabled or merged
    adapters add nothing (merged ones are in W). An `nn.Linear` that code outside the model hooked (tensor
    parallelism: `parallelize.tensor_parallel`) runs as a module, or in deterministic mode through the
    `batch_invariant(x)` that code set on it (its fixed-chunk equivalent). Inside a rollout's
    `packed_weights.packed_projections`, a plain `nn.Linear` runs on its oneDNN copy."""
    y = packed_weights.single(module, x, deterministic)
    if y is not None:
        return y
    if hasattr(module, "disabled") and hasattr(module, "scaling"):  # our LoRALinear
        y = linear(x, module.weight, module.bias, deterministic)
        if module.disabled:
            return y
        a, b = module.lora_A, module.lora_B
        z = linear(module.dropout(x.to(a.weight.dtype)), a.weight, None, deterministic)  # (T, r)
        return (y + linear(z, b.weight, b.bias, deterministic) * module.scaling).to(y.dtype)
    base = getattr(module, "base_layer", module)  # peft keeps the wrapped layer as `base_layer`
    if isinstance(base, nn.Linear):  # one with hooks put on it from outside (tensor parallelism) runs as a module,
        hooked = base._forward_pre_hooks or base._forward_hooks  # or in deterministic mode as its `batch_invariant`
        if deterministic and getattr(base, "batch_invariant", None) is not None:
            y = base.batch_invariant(x)
        else:
            y = base(x) if hooked and not deterministic else linear(x, base.weight, base.bias, deterministic)
    else:
        y = conv1d(x, base.weight, base.bias, deterministic)
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or module.disable_adapters or module.merged:
        return y
    out = y
    for name in module.active_adapters:
        if name not in lora_a:
            continue
        a, b = lora_a[name], module.lora_B[name]
        z = linear(module.lora_dropout[name](x.to(a.weight.dtype)), a.weight, None, deterministic)  # (T, r)
        out = out + linear(z, b.weight, b.bias, deterministic) * module.scaling[name]
    return out.to(y.dtype)  # the base layer's dtype, as peft returns it (fp32 adapters on a bf16 base)


def _gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS = {  # Hugging Face `hidden_act` names -> the formula transformers' ACT2FN computes for each
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_tanh_formula,  # GPT-2's: the tanh approximation written out (not bitwise F.gelu's)
}


def activation(name: str):
    """The elementwise activation a Hugging Face config names (`hidden_act`, `activation_function`), as a function;
    names outside the table fall back to transformers' own `ACT2FN` (its stateless forward, not a module)."""
    fn = _ACTIVATIONS.get(name)
    if fn is None:
        from transformers.activations import ACT2FN

        fn = ACT2FN[name].forward
    return fn


SIMD_PAD = 64  # columns: a multiple of every CPU vector loop's step (AVX-512 unrolled twice = 32 floats)
GRAIN = 32768  # elements: at most this many per call, so PyTorch never splits one call across threads


def elementwise(fn, x: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """fn(x) for an elementwise `fn` (an activation) on x (T, W). When deterministic, every element goes through the
    same code path wherever its row sits: PyTorch's CPU kernels compute the tail of a vectorised loop (and of each
    thread's share) with scalar code whose exp/tanh can differ by an ulp, and which elements land in a tail depends
    on the tensor's size, i.e. on the batch. Rows are zero-padded to a multiple of SIMD_PAD columns and processed in
    calls of at most GRAIN elements, so there is no tail and no thread split."""
    if not deterministic or x.device.type != "cpu":
        return fn(x)
    t, w = x.shape
    xp = F.pad(x, (0, -w % SIMD_PAD))  # (T, Wp)
    rows = max(1, GRAIN // xp.shape[1])
    return torch.cat([fn(c) for c in xp.split(rows)])[:, :w]


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """GPT-2's Conv1D: x (T, in) @ weight (in, out) + bias -> (T, out)."""
    if not deterministic:
        return torch.addmm(bias, x, weight)
    return linear(x, weight.t(), bias, True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dim, computed in fp32 like Hugging Face's."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * xf.to(x.dtype)


def rope_tables(inv_freq: torch.Tensor, scaling: float, max_positions: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin (max_positions, head_dim) of rotary embeddings with inverse frequencies `inv_freq` (head_dim/2,)
    and attention scaling `scaling`, computed as transformers' rotary modules do (fp32 product of positions and
    inv_freq, duplicated, cos / sin times `scaling`, cast to `dtype`); the sin table's first half is negated, so that
    `apply_rotary` needs no negation per call."""
    pos = torch.arange(max_positions, device=device)[None]  # (1, P)
    freqs = pos[..., None].float() * inv_freq.to(device=device, dtype=torch.float)  # (1, P, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (1, P, D)
    cos, sin = (emb.cos() * scaling)[0].to(dtype), (emb.sin() * scaling)[0].to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


class Rope:
    """A model's rotary tables, made on first use per (device, dtype) and kept out of the state dict (a plain
    object, not a buffer): inv_freq (head_dim/2,) fp32 on the host, `scaling` the attention scaling."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int):
        self.inv_freq, self.scaling, self.max_positions = inv_freq, scaling, max_positions
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (T, head_dim) at positions (T,)."""
        key = (positions.device, dtype)
        if key not in self._tables:
            self._tables[key] = rope_tables(self.inv_freq, self.scaling, self.max_positions, dtype, positions.device)
        cos, sin = self._tables[key]
        return cos[positions], sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated by cos / signed sin (T, D) from `rope_tables` (the rotate-half convention of
    Llama/Qwen2/Mistral): x cos + (-x2, x1) sin, written as x cos + (x2, x1) (-sin1, sin2), bit for bit the same."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return x * cos[:, None, :] + swapped * sin_signed[:, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor | None, meta: AttnMetadata,
              scale: float, window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q (T, H, D), k/v (T, KVH, D) of this step's tokens; kv (2, num_blocks, block_size, KVH, D) this layer's cache.

    Writes k/v into the cache at `meta.slot_mapping`, then attends: causal within each packed sequence (prefill) or
    over the cache through the block tables (decode, and every step in deterministic mode). `window` W > 0: each
    query sees only the last W keys up to itself (a sliding-window layer); `softcap` > 0: scores capped to
    c tanh(s / c); `sinks` (H,): per-head sink logits (see `ops.paged_attention`). Returns (T, H, D).
    """
    if kv is not None and meta.slot_mapping is not None:
        ops.store_kv_cache(k, v, kv[0], kv[1], meta.slot_mapping)
    if meta.block_tables is not None:
        return ops.paged_attention(q, kv[0], kv[1], meta.block_tables, meta.context_lens, scale=scale,
                                   sliding_window=window, softcap=softcap, sinks=sinks)
    return _varlen_causal(q, k, v, meta.cu_seqlens, scale, window, softcap, sinks)


def cache_attention(meta: AttnMetadata, kv_cache: torch.Tensor | None):
    """The rollout's `attend(layer, q, k, v, scale, window=0, softcap=0.0, sinks=None)` for `DecoderLM.forward`:
    `attention` on layer i's cache."""
    def attend(i, q, k, v, scale, window=0, softcap=0.0, sinks=None):
        return attention(q, k, v, None if kv_cache is None else kv_cache[i], meta, scale, window, softcap, sinks)
    return attend


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, mask: torch.Tensor | None = None,
         causal: bool = False, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k, v (B, KVH, Lk, D) (grouped-query), under a bool mask broadcastable to
    (B, H, Lq, Lk) (True = attend) or causal (Lq == Lk). Without `softcap` / `sinks`: exactly
    `F.scaled_dot_product_attention`. With them (SDPA has neither) the scores are explicit, in fp32, as
    `ops.paged_attention` defines them: s = scale q k^T, softcap c tanh(s / c), masked; each head's sink logit joins
    the softmax as a last column that is then dropped: p_t = exp(s_t) / (exp(sink) + sum exp(s)). Differentiable."""
    gqa = q.shape[1] != k.shape[1]
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)  # (B, H, Lk, D)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lk = s.shape[-1]
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)  # (B, H, Lq, 1)
        s = torch.cat((s, sink), -1)
    p = torch.softmax(s, -1)[..., :lk]
    return torch.matmul(p, vf).to(q.dtype)  # (B, H, Lq, D)


def window_causal_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) bool, bottom-right aligned (query i sits at key position k_len - q_len + i): key j is seen when
    j <= i's position and j > i's position - window (window 0: causal only), as transformers'
    `sliding_window_causal_mask`."""
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    mask = cols <= qpos
    return mask & (cols > qpos - window) if window > 0 else mask


def _varlen_causal(q, k, v, cu_seqlens: list[int], scale: float, window: int = 0, softcap: float = 0.0,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    if q.is_cuda and sinks is None:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None and q.dtype in (torch.float16, torch.bfloat16):
            cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
            max_len = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True,
                                          window_size=(window - 1, 0) if window > 0 else (-1, -1),
                                          **({"softcap": softcap} if softcap else {}))
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, L, D)
        if window > 0 and b - a > window:
            mask = window_causal_mask(b - a, b - a, window, q.device)
            o = sdpa(qs, ks, vs, scale, mask=mask, softcap=softcap, sinks=sinks)
        else:
            o = sdpa(qs, ks, vs, scale, causal=True, softcap=softcap, sinks=sinks)
        out[a:b] = o[0].transpose(0, 1)
    return out
