"""Mixture-of-experts feed-forward layers over packed tokens: a top-k router, experts computed grouped, and routing
replay (`RoutingRecord`).

A layer routes each token to k of E experts (gated MLPs) and sums their outputs weighted by the router:

    p = softmax(x W_r^T)                    (T, E), in fp32
    ids = top-k(p)                          (T, k)
    w = p[ids]  (/ sum_k p[ids] when the family renormalises: Mixtral always, Qwen3-MoE with `norm_topk_prob`)
    y = sum_j w_j * down_e(act(gate_e x) * up_e x)     e = ids_j, summed in ascending expert id

Experts hold stacked weights (`Experts.gate_up_proj` (E, 2F, H), `down_proj` (E, H, F)), the layout transformers
keeps in memory. The T*k (token, expert) pairs are sorted by expert and each expert's rows go through one GEMM:
`torch.nn.functional.grouped_mm` where it runs (fp32/bf16/fp16 on the CPU, bf16 on CUDA from sm80, rows aligned to
16 bytes), else one `F.linear` per expert; in deterministic mode one batch-invariant `layers.linear` per expert.

Routing replay: a forward given a `RoutingRecord` either records the experts each token was routed to, per MoE
layer, or replays recorded ones: the tokens go to the recorded experts whatever the current router says, and the
gate weights w are recomputed from the current router's probabilities at those experts (renormalised as the family
does), so the router still gets gradients. A token the record does not cover (ids -1) is routed by the router.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast.models.layers import elementwise, linear


class RoutingRecord:
    """The experts of one forward's tokens, per MoE layer: recorded by it, or given to it to replay.

    `RoutingRecord.record()`: the forward routes by the router and records; `RoutingRecord.replay(experts)`: the
    forward routes by `experts`. Either way, afterwards:
      * `experts` (M, T, k) int64: the experts each of the forward's T input tokens went to in each of the model's M
        MoE layers (`MixtralLM.moe_layers` order), in the router's top-k order; -1 for a token a layer did not
        compute (the last layer under `out_rows` computes only those rows);
      * `flipped` (M, T) bool and `flip_fraction()` (replay): where the current router's top-k differs from the
        replayed experts (as sets);
      * `balance_loss()` (with `balance_loss=True`): the router load-balancing loss of the forward.
    Each layer's entry is set, not appended, so a block recomputed in the backward (activation checkpointing)
    leaves the record as the forward left it. One record serves one forward.
    """

    def __init__(self, experts: torch.Tensor | None = None, *, balance_loss: bool = False):
        if experts is not None and experts.dim() != 3:
            raise ValueError(f"replayed experts must be (moe_layers, tokens, k), got shape {tuple(experts.shape)}")
        self.given = experts
        self.balance = balance_loss
        self._ids: dict[int, torch.Tensor] = {}  # MoE layer -> (T, k) int64 experts used
        self._flipped: dict[int, torch.Tensor] = {}  # -> (T,) bool
        self._replayed: dict[int, torch.Tensor] = {}  # -> (T,) bool: rows routed by the record
        self._load: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # -> (counts (E,), prob sums (E,), rows)

    @classmethod
    def record(cls, *, balance_loss: bool = False) -> RoutingRecord:
        """A record a forward fills: every token routed by the router, its experts kept."""
        return cls(None, balance_loss=balance_loss)

    @classmethod
    def replay(cls, experts: torch.Tensor, *, balance_loss: bool = False) -> RoutingRecord:
        """A record a forward replays: `experts` (M, T, k) integer, T the forward's input tokens (-1: route by the
        router), e.g. a rollout's recorded experts laid out as the training forward's packed stream."""
        return cls(experts, balance_loss=balance_loss)

    @property
    def replaying(self) -> bool:
        return self.given is not None

    @property
    def experts(self) -> torch.Tensor:
        """(M, T, k) int64, the experts used per MoE layer (-1: a row the layer did not compute)."""
        if not self._ids:  # a dense model, or no forward yet
            return torch.empty(0, 0, 0, dtype=torch.long)
        return torch.stack([self._ids[i] for i in sorted(self._ids)])

    @property
    def flipped(self) -> torch.Tensor:
        """(M, T) bool: the current router's top-k differs from the replayed experts (False where none replayed)."""
        if not self._flipped:
            return torch.empty(0, 0, dtype=torch.bool)
        return torch.stack([self._flipped[i] for i in sorted(self._flipped)])

    def flip_fraction(self, *, any_layer: bool = False) -> float:
        """The fraction of replayed (layer, token) pairs whose recomputed top-k differs from the replayed experts;
        `any_layer`: of tokens replayed in some layer, those that differ in at least one. 0.0 when nothing was
        replayed (a record, or a dense model)."""
        if not self._flipped:
            return 0.0
        flipped = self.flipped
        replayed = torch.stack([self._replayed[i] for i in sorted(self._replayed)])
        if any_layer:
            flipped, replayed = flipped.any(0), replayed.any(0)
        n = int(replayed.sum())
        return int(flipped.sum()) / n if n else 0.0

    def balance_loss(self) -> torch.Tensor:
        """The router load-balancing loss of the forward (Switch Transformer eq. 4-6, as transformers'
        `load_balancing_loss_func` computes it over the MoE layers together):

            N f_e * P_e summed over experts e, times E:   E * sum_e (c_e / N) (s_e / N)

        c_e the (token, layer) pairs dispatched to expert e (k per token and layer), s_e the router probability of
        e summed over tokens and layers, N the tokens times the MoE layers. Differentiable through s_e (the router);
        a forward with `out_rows` counts the last layer's computed rows only. Scalar fp32; 0 for a dense model."""
        if not self.balance:
            raise ValueError("balance_loss: make the record with balance_loss=True before the forward")
        if not self._load:
            return torch.zeros(())
        counts = sum(c for c, _, _ in self._load.values())
        probs = sum(p for _, p, _ in self._load.values())
        n = sum(r for _, _, r in self._load.values())
        return (counts / n * (probs / n)).sum() * counts.shape[0]

    # ------------------------------------------------------------------ the MoE layers' side
    def chosen(self, layer: int, num_tokens: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The replayed experts (R, k) int64 of MoE layer `layer` for the rows it computes (None: record mode)."""
        if self.given is None:
            return None
        if layer >= self.given.shape[0] or self.given.shape[1] != num_tokens:
            raise ValueError(f"replayed experts of shape {tuple(self.given.shape)} do not fit MoE layer {layer} of "
                             f"a forward over {num_tokens} tokens")
        ids = self.given[layer].to(torch.long)
        return ids if rows is None else ids.index_select(0, rows.to(ids.device))  # (R, k) on the record's device

    def put(self, layer: int, num_tokens: int, rows: torch.Tensor | None, ids: torch.Tensor,
            flipped: torch.Tensor | None, replayed: torch.Tensor | None) -> None:
        """Keep MoE layer `layer`'s experts `ids` (R, k) (and its flips (R,) when replaying) of the rows it computed."""
        ids = ids.detach()
        if rows is not None:
            full = ids.new_full((num_tokens, ids.shape[1]), -1)
            self._ids[layer] = full.index_copy_(0, rows, ids)
        else:
            self._ids[layer] = ids
        if flipped is not None:
            self._flipped[layer] = _scatter_rows(flipped, num_tokens, rows)
            self._replayed[layer] = _scatter_rows(replayed, num_tokens, rows)

    def add_load(self, layer: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        """Keep MoE layer `layer`'s dispatch counts and summed router probabilities (for `balance_loss`)."""
        if self.balance:
            counts = torch.bincount(ids.reshape(-1), minlength=probs.shape[1]).float()
            self._load[layer] = (counts, probs.sum(0), probs.shape[0])


def stream_experts(samples, num_tokens: int, per_sample: list[torch.Tensor]) -> torch.Tensor:
    """The experts (M, T, k) int64 of a packed stream (`models.packed.PackedBatch`: `samples`, `num_tokens`) for
    `RoutingRecord.replay`, from each sequence's recorded experts (M, n_i, k) over its tokens prompt + response in
    order (a rollout's record: n_i may stop short of the last response token, which no forward read; the rows left
    are -1, routed by the router). A prompt shared by several samples (`share_prompts`) takes the first's rows."""
    if len(per_sample) != len(samples):
        raise ValueError(f"{len(per_sample)} records for {len(samples)} sequences")
    m, _, k = per_sample[0].shape
    out = torch.full((m, num_tokens, k), -1, dtype=torch.long, device=per_sample[0].device)
    done: set[int] = set()
    for (ps, pe, rs, re_), rec in zip(samples, per_sample):
        n, plen = rec.shape[1], pe - ps
        if n > plen + re_ - rs:
            raise ValueError(f"a record of {n} tokens for a sequence of {plen + re_ - rs}")
        if ps not in done:
            out[:, ps:ps + min(n, plen)] = rec[:, :plen]
            done.add(ps)
        out[:, rs:rs + max(0, n - plen)] = rec[:, plen:]
    return out


def _scatter_rows(x: torch.Tensor, num_tokens: int, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.new_zeros(num_tokens).index_copy_(0, rows, x)


def route(logits: torch.Tensor, k: int, renormalise: bool,
          chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k routing of router logits (N, E) -> ids (N, k) int64, weights (N, k) fp32, probs (N, E) fp32, and
    (replay) flipped (N,) bool.

    probs = softmax(logits) in fp32; ids = `chosen` (N, k) where given (rows holding -1 take the router's own), else
    top-k(probs) in descending order; weights = probs at ids, divided by their sum when `renormalise` (as
    transformers' routers: the same values in the same order, so a replay of a record is bitwise the record).
    flipped: the router's own top-k differs from `chosen` as a set (False on the rows that took the router's own)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(k, dim=-1).indices  # (N, k)
    flipped = None
    if chosen is not None:
        if chosen.shape != top.shape:
            raise ValueError(f"replayed experts have shape {tuple(chosen.shape)}, the layer routes {tuple(top.shape)}")
        own = (chosen < 0).any(-1)  # (N,) rows the record does not cover
        flipped = (top.sort(-1).values != chosen.sort(-1).values).any(-1) & ~own
        top = torch.where(own[:, None], top, chosen)
    weights = probs.gather(1, top)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return top, weights, probs, flipped


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor, deterministic: bool) -> bool:
    if deterministic or not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        dtypes = (torch.bfloat16,) if torch.cuda.get_device_capability(x.device) >= (8, 0) else ()
    else:
        return False
    align = 16 // x.element_size()
    return x.dtype in dtypes and weight.dtype == x.dtype and not x.shape[1] % align and not weight.shape[1] % align


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """Rows x (N, in) sorted by group, `counts` (G,) rows per group -> (N, out): group g's rows times weight[g].T
    (weight (G, out, in)). One grouped GEMM where `grouped_mm` runs, else one GEMM per group (batch-invariant row
    chunks when deterministic)."""
    if _grouped_mm_ok(x, weight, deterministic):
        offs = counts.cumsum(0).to(torch.int32)  # each group's end row
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    parts = x.split(counts.tolist())
    return torch.cat([linear(p, weight[g], None, deterministic) for g, p in enumerate(parts)])


class Router(nn.Module):
    """The router's weight (E, hidden): logits = x W^T (not an nn.Linear, so LoRA's `all-linear` leaves it alone,
    as peft does transformers' router)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        _uniform(self.weight, hidden)


class Experts(nn.Module):
    """E gated MLPs stacked: `gate_up_proj` (E, 2F, hidden) (gate rows, then up rows), `down_proj` (E, hidden, F)."""

    def __init__(self, hidden: int, inner: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        _uniform(self.gate_up_proj, hidden)
        _uniform(self.down_proj, inner)


def _uniform(w: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so that a freshly built model
    (`models.build_model`) holds no uninitialised memory; a no-op on the meta device."""
    if w.device.type != "meta":
        bound = fan_in ** -0.5
        with torch.no_grad():
            w.uniform_(-bound, bound)


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: nn.Module, act,
                    deterministic: bool) -> torch.Tensor:
    """x (N, hidden) through experts `ids` (N, k), weighted by `weights` (N, k) -> (N, hidden) in x's dtype.

    Pairs sorted by expert (each token's k in ascending expert id, so its outputs sum in transformers' order),
    each expert's rows one GEMM (`grouped_linear`), scattered back and summed over the k slots."""
    n, k = ids.shape
    num_experts = experts.gate_up_proj.shape[0]
    ids, perm = ids.sort(-1)  # (N, k) ascending expert id per token
    weights = weights.gather(1, perm)
    flat = ids.reshape(-1)  # (N*k,)
    order = flat.argsort(stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    xs = x.index_select(0, order // k)  # (N*k, hidden)
    gate, up = grouped_linear(xs, experts.gate_up_proj, counts, deterministic).chunk(2, dim=-1)  # (N*k, F) each
    ys = grouped_linear(elementwise(act, gate, deterministic) * up, experts.down_proj, counts, deterministic)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    y = ys.index_select(0, inverse).view(n, k, -1)  # (N, k, hidden) in slot order
    out = torch.zeros_like(x)
    for j in range(k):  # k slots (not tokens): 0 + y_1 w_1 + y_2 w_2 ..., as transformers' index_add
        out = out + (y[:, j] * weights[:, j, None]).to(x.dtype)
    return out


def experts_partial(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, first: int, act, deterministic: bool) -> torch.Tensor:
    """What experts `first` .. `first + G - 1` (weights `gate_up` (G, 2F, hidden), `down` (G, hidden, F), a slice of
    the E stacked experts) add to `experts_forward`'s output: x (N, hidden) through the pairs of `ids` (N, k) that
    name one of them, weighted by `weights` (N, k) -> (N, hidden) in x's dtype, zero where a token has none of them.
    Summed over slices covering all E experts it is `experts_forward` (within rounding): an expert-parallel rank's
    share (`parallelize.tensor_parallel`). The same order as `experts_forward`: each token's k pairs in ascending
    expert id, each expert's rows one GEMM, the k slots summed in order."""
    n, k = ids.shape
    g = gate_up.shape[0]
    ids, perm = ids.sort(-1)
    weights = weights.gather(1, perm)
    flat = ids.reshape(-1) - first  # (N*k,) local expert index, outside 0..G-1: another rank's expert
    pairs = ((flat >= 0) & (flat < g)).nonzero().squeeze(1)  # the pairs this slice computes
    local = flat.index_select(0, pairs)
    order = local.argsort(stable=True)  # grouped by expert
    pairs = pairs.index_select(0, order)
    counts = torch.bincount(local, minlength=g)  # (G,)
    xs = x.index_select(0, pairs // k)  # (P, hidden)
    gate, up = grouped_linear(xs, gate_up, counts, deterministic).chunk(2, dim=-1)
    ys = grouped_linear(elementwise(act, gate, deterministic) * up, down, counts, deterministic)  # (P, hidden)
    y = ys.new_zeros(n * k, ys.shape[1]).index_copy(0, pairs, ys).view(n, k, -1)  # (N, k, hidden) slot order
    out = torch.zeros_like(x)
    for j in range(k):  # as experts_forward: 0 + y_1 w_1 + y_2 w_2 ... (another rank's pairs add 0 * w = 0)
        out = out + (y[:, j] * weights[:, j, None]).to(x.dtype)
    return out


class SparseMoE(nn.Module):
    """A mixture-of-experts MLP: `router` (Router) and `experts` (Experts), top-k of E.

    `moe_index`: this layer's place among the model's MoE layers (its entry in a `RoutingRecord`); `renormalise`:
    the top-k weights are divided by their sum; `weights_in_model_dtype`: the weights are cast to the router
    logits' dtype before they scale the experts' outputs (Qwen3-MoE; Mixtral keeps them fp32)."""

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, act, *, moe_index: int,
                 renormalise: bool, weights_in_model_dtype: bool):
        super().__init__()
        self.router = Router(hidden, num_experts)
        self.experts = Experts(hidden, inner, num_experts)
        self.top_k, self.act, self.moe_index = top_k, act, moe_index
        self.renormalise, self.weights_in_model_dtype = renormalise, weights_in_model_dtype

    def forward(self, x: torch.Tensor, deterministic: bool, routing: RoutingRecord | None = None,
                rows: torch.Tensor | None = None, num_tokens: int | None = None) -> torch.Tensor:
        """x (R, hidden) -> (R, hidden). `routing`: record or replay this layer's experts; `rows` (R,): the rows
        of the forward's `num_tokens` input tokens that x holds (None: all of them, R = num_tokens)."""
        num_tokens = x.shape[0] if num_tokens is None else num_tokens
        logits = linear(x, self.router.weight, None, deterministic)  # (R, E)
        chosen = None if routing is None else routing.chosen(self.moe_index, num_tokens, rows)
        if chosen is not None:
            chosen = chosen.to(x.device)
        ids, weights, probs, flipped = route(logits, self.top_k, self.renormalise, chosen)
        if self.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        if routing is not None:
            replayed = None if chosen is None else (chosen >= 0).all(-1)
            routing.put(self.moe_index, num_tokens, rows, ids, flipped, replayed)
            routing.add_load(self.moe_index, ids, probs)
        split = getattr(self.experts, "split", None)  # experts split over ranks by code outside the model
        if split is not None:  # (`parallelize.tensor_parallel`): this rank's experts' share, summed over the ranks
            return split(x, ids, weights, self.act, deterministic)
        return experts_forward(x, ids, weights, self.experts, self.act, deterministic)
