"""Padding-free training forwards of the decoders: packed sequences and shared prompts, with gradients.

A `PackedBatch` is one token stream (no padding) cut into attention segments. A segment covers the stream rows
[start, end) and attends causally to itself after attending to every row of its prefix [prefix_start, prefix_end):
  * packed sequences (`share_prompts=False`): each sequence (prompt + response) is one segment with no prefix,
    the layout of flash-attn's varlen `cu_seqlens`;
  * shared prompts (`share_prompts=True`): each distinct prompt is one segment, followed in the stream by the
    responses of its samples, each a segment whose prefix is the prompt. The prompt is computed once; every
    response token attends to the prompt's keys and values, so autograd sums the `n` samples' gradients into the
    shared prompt rows.
Positions restart at 0 per sequence (a response continues at its prompt's length), as in a padded batch.

The forward is the model's own (`DecoderLM.forward`, the one the rollout engine runs), here with autograd: its
numerics are those of the Hugging Face forward (tests: Llama, Qwen2, GPT-2). On CUDA
in half precision attention is flash-attn's varlen kernel when installed; otherwise PyTorch SDPA per prompt group.
With `deterministic=True` the GEMMs run in the rollout's fixed row chunks and attention is per segment, so a sequence's
result does not depend on what else is packed with it (batch invariance).
"""
from __future__ import annotations

import dataclasses

import torch

from rlhf_fast.models import as_decoder
from rlhf_fast.models.layers import sdpa


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """N sequences as one stream of T tokens.

    input_ids, positions: (T,) int64.
    segments: (start, end, prefix_start, prefix_end) per attention segment, in stream order, covering 0..T.
    samples: (prompt_start, prompt_end, response_start, response_end) stream rows of each sequence, input order.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    segments: tuple[tuple[int, int, int, int], ...]
    samples: tuple[tuple[int, int, int, int], ...]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def predict_index(self, width: int) -> torch.Tensor:
        """(N, width) int64: the stream row whose hidden state predicts response token j of each sequence (the
        prompt's last row for j = 0); rows past a response's end point at that last row (mask them out)."""
        return self._predict_index_host(width).to(self.device)

    def last_index(self) -> torch.Tensor:
        """(N,) int64: the stream row of each sequence's last token (the reward model's score position)."""
        return self._last_index_host().to(self.device)

    def predict_reads(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict_index(width)` as (its distinct rows (R,), positions (N, width) in them), for
        `packed_hidden(..., rows=rows)[pos]`: the same values, with the last layer's output projection and MLP run
        on the read rows alone. Built on the host from the batch's layout (no device sync)."""
        return self._reads(self._predict_index_host(width))

    def last_reads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`last_index()` as (distinct rows (R,), positions (N,)), like `predict_reads`."""
        return self._reads(self._last_index_host())

    def _predict_index_host(self, width: int) -> torch.Tensor:
        idx = torch.empty(len(self.samples), width, dtype=torch.int64)
        j = torch.arange(width)
        for i, (_, pe, rs, re_) in enumerate(self.samples):
            jj = j.clamp(max=max(re_ - rs - 1, 0))
            idx[i] = torch.where(jj == 0, pe - 1, rs + jj - 1)
        return idx

    def _last_index_host(self) -> torch.Tensor:
        return torch.tensor([re_ - 1 if re_ > rs else pe - 1 for _, pe, rs, re_ in self.samples], dtype=torch.int64)

    def _reads(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, pos = torch.unique(index.reshape(-1), return_inverse=True)  # on the host
        return rows.to(self.device), pos.view(index.shape).to(self.device)

    def attention_work(self) -> int:
        """Query-key pairs attended (a FLOP proxy of the attention; the matmuls scale with `num_tokens`)."""
        return sum((e - s) * (pe - ps) + (e - s) * (e - s + 1) // 2 for s, e, ps, pe in self.segments)


def pack(prompts: list[list[int]], responses: list[list[int]], *, groups: list[int] | None = None,
         share_prompts: bool = False, device: torch.device | str = "cpu") -> PackedBatch:
    """Pack sequence i = prompts[i] + responses[i] (each prompt non-empty).

    groups: (N,) sequences with the same group id have the same prompt (e.g. the rollout's `prompt_index`); with
        `share_prompts` each group's prompt is computed once. None: every sequence is its own group.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    if groups is None:
        groups = list(range(len(prompts)))
    elif len(groups) != len(prompts):
        raise ValueError(f"groups must have one entry per sequence ({len(prompts)}), got {len(groups)}")
    ids: list[int] = []
    pos: list[int] = []
    segments: list[tuple[int, int, int, int]] = []
    samples: list[tuple[int, int, int, int] | None] = [None] * len(prompts)

    def put(tokens: list[int], first_pos: int, prefix: tuple[int, int]) -> tuple[int, int]:
        start = len(ids)
        ids.extend(tokens)
        pos.extend(range(first_pos, first_pos + len(tokens)))
        if tokens:
            segments.append((start, len(ids), *prefix))
        return start, len(ids)

    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if not prompts[i]:
            raise ValueError(f"prompts[{i}] is empty: every sequence needs at least one prompt token")
        by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        if share_prompts:
            p = list(prompts[members[0]])
            if any(list(prompts[i]) != p for i in members):
                raise ValueError("share_prompts: sequences of one group must have the same prompt")
            ps, pe = put(p, 0, (0, 0))
            for i in members:
                rs, re_ = put(list(responses[i]), len(p), (ps, pe))
                samples[i] = (ps, pe, rs, re_)
        else:
            for i in members:
                p = list(prompts[i])
                s, e = put(p + list(responses[i]), 0, (0, 0))
                samples[i] = (s, s + len(p), s + len(p), e)
    dev = torch.device(device)
    return PackedBatch(torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(pos, dtype=torch.int64,
                       device=dev), tuple(segments), tuple(samples))  # type: ignore[arg-type]


BATCH_MIN_WORK = 1 << 22  # query-key pairs x heads x head_dim a unit must save to run as prompt + response batch


def packed_hidden(model: torch.nn.Module, batch: PackedBatch, *, deterministic: bool = False,
                  rows: torch.Tensor | None = None, routing=None) -> torch.Tensor:
    """Final (normed) hidden states (T, hidden) of `batch` through `model` (a `DecoderLM`, or a transformers causal
    LM or backbone, converted by `models.from_hf` sharing its parameters), differentiable w.r.t. its parameters.
    `rows` (R,) int64 stream rows: only those are returned, (R, hidden), and the last layer runs its output
    projection and MLP on them alone (`DecoderLM.forward(out_rows=...)`): a shared prompt's rows are read by no one
    but its last, a reward model reads one row per sequence.

    The decoder is called as a module, so what `parallelize` applied to it (FSDP2 on its blocks and root, per-block
    activation checkpointing, compile) runs as in any forward. `routing` (`moe.RoutingRecord`, keyed by the T stream
    rows): a mixture-of-experts model records or replays its experts there (`DecoderLM.forward`)."""
    lm = as_decoder(model)
    if batch.num_tokens and int(batch.positions.max()) >= lm.max_context:
        raise ValueError(f"a packed sequence reaches position {int(batch.positions.max())}, over the model's "
                         f"context {lm.max_context}")
    attend = _SegmentAttention(batch, deterministic)
    return lm(batch.input_ids.to(lm.device), batch.positions.to(lm.device), attend, deterministic,
              None if rows is None else rows.to(lm.device), routing=routing)


class _SegmentAttention:
    """`attend(layer, q, k, v, scale)` over a batch's segments (one plan reused by every layer).

    CPU / fp32, by attention unit: a prompt with the responses that share it (`share_prompts`), or a sequence of
    its own. Per-sample calls (short segments: the K completions of an RM prompt, the n samples of a PPO prompt)
    made the call overhead dominate, so a shared prompt's unit takes one of two forms, whatever its number of
    samples, chosen by its shape alone:
      * one SDPA call over the whole unit under a boolean mask (each response row sees the prompt and, causally,
        its own response), which also computes the masked-out pairs between the prompt's responses;
      * two calls, once that waste is worth more than BATCH_MIN_WORK query-key-dim products: the prompt, causal;
        then its responses as one batch, each response's queries against the prompt's keys followed by its own
        (causal), padded to the unit's longest (padded keys masked out, padded queries dropped). The prompt's keys
        and values are gathered once per response, so autograd sums the responses' gradients into them. (PPO's
        64-token prompts with 4 x 64-token responses: 2.8x fewer pairs; the default task's 10-token prompts are
        faster as one call.)
    Consecutive lone sequences of one length run as one batched causal call. A unit's result depends
    only on the unit, so a prompt group scored whole and later trained whole (PPO's minibatches of whole groups)
    gets bitwise the same attention. In deterministic mode every segment is its own call, so its result cannot
    depend on its neighbours (batch invariance).

    A sliding-window layer (`window` W > 0) takes the same calls, each under its mask and `key position > query
    position - W` (the batch's positions: a response's continue its prompt's), built once per call and window.
    Soft-capping and sinks (`softcap`, `sinks` (H,)) go through `layers.sdpa`, which computes them explicitly."""

    def __init__(self, batch: PackedBatch, deterministic: bool):
        self.segments = batch.segments
        self.deterministic = deterministic
        self.positions = batch.positions
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.window_masks: dict[tuple, torch.Tensor] = {}
        self.varlen = None  # (kv_index, cu_q, cu_k, max_q, max_k) for flash-attn, built on first use
        index = {(s, e): j for j, (s, e, _, _) in enumerate(self.segments)}
        self.lengths = [e - s for s, e, _, _ in self.segments]
        self.prefix = [index[(ps, pe)] if pe > ps else None for _, _, ps, pe in self.segments]
        # units in stream order: (first segment, end segment); a segment with a prefix joins its prefix's unit
        self.units: list[list[int]] = []
        for j, pre in enumerate(self.prefix):
            if pre is not None and self.units and self.units[-1][0] == pre:
                self.units[-1][1] = j + 1
            elif pre is not None:
                raise ValueError(f"packed batch: segment {j}'s prefix is not the segment that starts its unit "
                                 "(`pack` puts each response right after its prompt and the other responses of it)")
            else:
                self.units.append([j, j + 1])
        # calls: ("run", [segments]) lone equal-length sequences batched, or ("unit", (first, end)): a prompt group
        self.calls: list[tuple[str, object]] = []
        for first, end in self.units:
            lone = end - first == 1 and self.prefix[first] is None
            prev = self.calls[-1] if self.calls else None
            if deterministic:
                self.calls.extend(("run", [j]) for j in range(first, end))
            elif lone and prev is not None and prev[0] == "run" and self.lengths[prev[1][-1]] == self.lengths[first]:
                prev[1].append(first)
            elif lone:
                self.calls.append(("run", [first]))
            else:
                self.calls.append(("unit", (first, end)))
        self.unit_plans: dict[int, tuple] = {}
        self.unit_masks: dict[int, torch.Tensor] = {}
        self.unit_batched: dict[int, bool] = {}

    def _batched(self, first: int, end: int, heads: int, head_dim: int) -> bool:
        """Whether unit [first, end) runs as prompt + response batch: when the pairs a whole-unit call would waste
        (between its responses, and past the padding of the batch) are worth more than BATCH_MIN_WORK."""
        if first not in self.unit_batched:
            p = self.lengths[first]
            lens = self.lengths[first + 1:end]
            whole = (p + sum(lens)) ** 2
            batch = p * p + len(lens) * max(lens) * (p + max(lens))
            self.unit_batched[first] = (whole - batch) * heads * head_dim >= BATCH_MIN_WORK
        return self.unit_batched[first]

    def _unit_mask(self, first: int, end: int, device: torch.device) -> torch.Tensor:
        """(rows, rows) bool over the unit's stream rows: a row sees its segment's prefix and its own segment up to
        itself."""
        if first not in self.unit_masks:
            row0, row1 = self.segments[first][0], self.segments[end - 1][1]
            start, pre_start, pre_end = (torch.empty(row1 - row0, dtype=torch.int64) for _ in range(3))  # per row
            for s, e, ps, pe in self.segments[first:end]:
                start[s - row0:e - row0] = s - row0
                pre_start[s - row0:e - row0] = ps - row0 if pe > ps else 0  # no prefix: the empty range [0, 0)
                pre_end[s - row0:e - row0] = pe - row0 if pe > ps else 0
            rows = torch.arange(row1 - row0)[:, None]
            cols = rows.T
            own = (cols >= start[:, None]) & (cols <= rows)
            mask = own | ((cols >= pre_start[:, None]) & (cols < pre_end[:, None]))
            self.unit_masks[first] = mask.to(device)
        return self.unit_masks[first]

    def _unit_plan(self, first: int, end: int, device: torch.device) -> tuple:
        """The response batch of unit [first, end) (its prompt is segment `first`): (query rows (n * Lmax,) or
        None when no response is padded, key rows (n * (P + Lmax),), mask (n, 1, Lmax, P + Lmax), kept output rows
        (n * Lmax,) or None, n, Lmax, P), as stream-row indices on `device`."""
        if first not in self.unit_plans:
            ps, pe = self.segments[first][:2]
            resp = self.segments[first + 1:end]
            lens = torch.tensor([e - s for s, e, _, _ in resp])  # (n,)
            n, lmax, p = len(resp), int(lens.max()), pe - ps
            t = torch.arange(lmax)
            starts = torch.tensor([s for s, _, _, _ in resp])
            q_rows = torch.where(t < lens[:, None], starts[:, None] + t, starts[:, None])  # (n, Lmax); pads: its first row
            k_rows = torch.cat((torch.arange(ps, pe).expand(n, p), q_rows), 1)  # (n, P + Lmax)
            own = (t[None, :] <= t[:, None])[None] & (t < lens[:, None])[:, None, :]  # (n, Lmax, Lmax)
            mask = torch.cat((torch.ones(n, lmax, p, dtype=torch.bool), own), 2)[:, None]
            ragged = bool((lens < lmax).any())
            kept = (t < lens[:, None]).flatten().nonzero().squeeze(1) if ragged else None
            self.unit_plans[first] = (q_rows.flatten().to(device) if ragged else None, k_rows.flatten().to(device),
                                      mask.to(device), None if kept is None else kept.to(device), n, lmax, p)
        return self.unit_plans[first]

    def _near(self, key: tuple, q_rows: torch.Tensor, k_rows: torch.Tensor, window: int,
              device: torch.device) -> torch.Tensor:
        """(..., Lq, Lk) bool: key row within the window of query row, position[q] - position[k] < window, for
        stream rows q_rows (..., Lq) and k_rows (..., Lk); cached under `key`."""
        if key not in self.window_masks:
            pos = self.positions.to(device)
            qp, kp = pos[q_rows.to(device)], pos[k_rows.to(device)]
            self.window_masks[key] = qp[..., :, None] - kp[..., None, :] < window
        return self.window_masks[key]

    @torch.compiler.disable  # a compile boundary: a block compiled by `parallelize` traces its projections, not this
    # plan (its Python over the batch's layout would recompile the block for every new batch)
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None and not self.deterministic and sinks is None:
            return self._flash(flash, q, k, v, scale, window, softcap)
        opts = dict(softcap=softcap, sinks=sinks)
        split = None  # per segment (L, heads, D), for the batched runs
        outs = []
        for kind, what in self.calls:
            if kind == "unit" and not self._batched(*what, q.shape[1], q.shape[2]):
                first, end = what
                row0, row1 = self.segments[first][0], self.segments[end - 1][1]
                qb, kb, vb = (z[row0:row1].transpose(0, 1)[None] for z in (q, k, v))  # (1, heads, rows, D)
                mask = self._unit_mask(first, end, q.device)
                if window:
                    rows = torch.arange(row0, row1)
                    mask = mask & self._near(("unit", first, window), rows, rows, window, q.device)
                o = sdpa(qb, kb, vb, scale, mask=mask, **opts)
                outs.append(o[0].transpose(0, 1))  # (rows, H, D)
                continue
            if kind == "unit":
                first, end = what
                ps, pe = self.segments[first][:2]
                qp, kp, vp = (z[ps:pe].transpose(0, 1)[None] for z in (q, k, v))  # (1, heads, P, D)
                if window:
                    rows = torch.arange(ps, pe)
                    causal = self._near(("prompt", first, window), rows, rows, window, q.device)
                    causal = causal & self._mask(pe - ps, 0, q.device)
                    o = sdpa(qp, kp, vp, scale, mask=causal, **opts)
                else:
                    o = sdpa(qp, kp, vp, scale, causal=True, **opts)
                outs.append(o[0].transpose(0, 1))  # (P, H, D)
                q_rows, k_rows, mask, kept, n, lmax, p = self._unit_plan(first, end, q.device)
                if window:
                    rs = self.segments[first + 1][0]
                    qr = q_rows if q_rows is not None else torch.arange(rs, rs + n * lmax, device=q.device)
                    near = self._near(("responses", first, window), qr.view(n, 1, lmax), k_rows.view(n, 1, -1),
                                      window, q.device)  # (n, 1, Lmax, P + Lmax)
                    mask = mask & near
                qb = q[pe:self.segments[end - 1][1]] if q_rows is None else q.index_select(0, q_rows)
                qb = qb.view(n, lmax, *q.shape[1:]).transpose(1, 2)  # (n, H, Lmax, D)
                kb, vb = (z.index_select(0, k_rows).view(n, p + lmax, *z.shape[1:]).transpose(1, 2)
                          for z in (k, v))  # (n, KVH, P + Lmax, D)
                o = sdpa(qb, kb, vb, scale, mask=mask, **opts)
                o = o.transpose(1, 2).reshape(n * lmax, *q.shape[1:])  # (n * Lmax, H, D)
                outs.append(o if kept is None else o.index_select(0, kept))
                continue
            run = what
            if split is None:
                split = tuple(z.split(self.lengths) for z in (q, k, v))
            qs, ks, vs = split
            n, length, pre = len(run), self.lengths[run[0]], self.prefix[run[0]]
            qb = torch.stack([qs[j] for j in run]).transpose(1, 2)  # (n, H, L, D)
            kb, vb = (torch.stack([z[j] for j in run]).transpose(1, 2) for z in (ks, vs))  # (n, KVH, L, D)
            if pre is None and not window:
                o = sdpa(qb, kb, vb, scale, causal=True, **opts)
            else:  # a windowed run, or (deterministic) a response on its own with its prompt's keys first
                p = 0
                if pre is not None:
                    kp, vp = (z[pre].transpose(0, 1)[None].expand(n, -1, -1, -1) for z in (ks, vs))  # (n, KVH, P, D)
                    kb, vb = torch.cat((kp, kb), 2), torch.cat((vp, vb), 2)  # (n, KVH, P + L, D)
                    p = kp.shape[2]
                mask = self._mask(length, p, q.device)
                if window:  # the rows of each segment (queries) and of its prefix then itself (keys)
                    segs = [self.segments[j] for j in run]
                    qr = torch.stack([torch.arange(s, e) for s, e, _, _ in segs])  # (n, L)
                    kr = torch.stack([torch.cat((torch.arange(ps, pe), torch.arange(s, e))) for s, e, ps, pe in segs])
                    mask = mask & self._near(("run", run[0], window), qr[:, None], kr[:, None], window, q.device)
                o = sdpa(qb, kb, vb, scale, mask=mask, **opts)
            outs.append(o.transpose(1, 2).reshape(n * length, *q.shape[1:]))  # (n * L, H, D)
        return torch.cat(outs)

    def _mask(self, q_len: int, prefix: int, device: torch.device) -> torch.Tensor:
        """(q_len, prefix + q_len) bool: every prefix key, then causal over the segment's own keys."""
        key = (q_len, prefix)
        if key not in self.masks:
            cols = torch.arange(prefix + q_len, device=device)
            self.masks[key] = cols[None, :] <= prefix + torch.arange(q_len, device=device)[:, None]
        return self.masks[key]

    def _flash(self, flash, q, k, v, scale, window=0, softcap=0.0):
        if self.varlen is None:
            kv_rows, cu_q, cu_k = [], [0], [0]
            for s, e, ps, pe in self.segments:
                kv_rows.extend(range(ps, pe))
                kv_rows.extend(range(s, e))
                cu_q.append(cu_q[-1] + e - s)
                cu_k.append(cu_k[-1] + (pe - ps) + (e - s))
            dev = q.device
            lens_q = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
            lens_k = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
            self.varlen = (torch.tensor(kv_rows, dtype=torch.int64, device=dev),
                           torch.tensor(cu_q, dtype=torch.int32, device=dev),
                           torch.tensor(cu_k, dtype=torch.int32, device=dev), max(lens_q), max(lens_k))
        kv_index, cu_q, cu_k, max_q, max_k = self.varlen
        if any(pe > ps for _, _, ps, pe in self.segments):
            k, v = k[kv_index], v[kv_index]  # each segment's keys: its prefix, then its own (bottom-right causal)
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True,
                     window_size=(window - 1, 0) if window > 0 else (-1, -1),
                     **({"softcap": softcap} if softcap else {}))


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func
