"""Pure-PyTorch reference of every op in `rlhf_fast.ops`.

This file is the test oracle (run in float64), the benchmark baseline and the fallback backend. Each function is
written for clarity, not speed: it may materialise full tensors that the kernels avoid. Keep one section per area.
"""
from __future__ import annotations

import torch

from rlhf_fast.kernels.loss_layout import LOG_RATIO_CLAMP  # noqa: F401 (re-exported)
from rlhf_fast.ops.loss_spec import (AGG_MODES, KL_KINDS, KLTerm, PPOAgg, PPOClip,  # noqa: F401 (re-exported)
                                     RolloutCorrection)

# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy (token_logprobs, linear_token_logprobs)
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def soft_cap(logits: torch.Tensor, softcap: float = 0.0) -> torch.Tensor:
    """Final logit soft-capping (Gemma 2/3): softcap * tanh(logits / softcap), applied before the temperature, as
    transformers' `Gemma2ForCausalLM.forward` does; its derivative is 1 - tanh^2(logits / softcap). 0: unchanged."""
    return logits if softcap == 0 else torch.tanh(logits / softcap) * softcap


def support_threshold(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      softcap: float = 0.0) -> torch.Tensor:
    """The support sampled from under top-k / top-p, as a threshold per row on z = soft_cap(logits) / temperature.

    Plain sort + cumsum (the oracle of the kernels' bisection). top-k: thr = the k-th largest z (ties with it kept).
    top-p, over the tokens top-k kept and p their softmax: thr = the z of the first sorted token at which the
    cumulative mass reaches top_p (the smallest nucleus reaching top_p, with the crossing token and its ties).
    logits (..., V) -> (...) in the compute dtype; -inf where nothing is cut (top_k 0 or >= V, top_p 1).
    """
    z = soft_cap(logits.to(_compute_dtype(logits)), softcap) * (1.0 / temperature)  # (..., V), the kernels' z
    v = z.shape[-1]
    zs = z.sort(-1, descending=True).values  # (..., V)
    thr = torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
    if 0 < top_k < v:
        thr = zs[..., top_k - 1]
    if top_p < 1.0:
        p = zs.masked_fill(zs < thr.unsqueeze(-1), float("-inf")).softmax(-1)  # (..., V) over the top-k kept
        first = (p.cumsum(-1) < top_p).sum(-1, keepdim=True).clamp_max(v - 1)  # first index with cumsum >= top_p
        thr = torch.maximum(thr, zs.gather(-1, first).squeeze(-1))
    return thr


_support_threshold = support_threshold  # token_logprobs' argument of that name hides the function


def _truncated(vocab: int, top_k: int, top_p: float) -> bool:
    return 0 < top_k < vocab or top_p < 1.0


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, support_threshold: torch.Tensor | None = None, ignore_index: int = -100,
                   return_entropy: bool = False, softcap: float = 0.0):
    """`log softmax(soft_cap(logits) / temperature)[label]` and optionally the entropy of that distribution.

    logits (..., V) float; labels (...) int. Returns logp (...) [, entropy (...)] in fp32 (fp64 for fp64 logits).
    Rows whose label is `ignore_index` give 0 for both (and receive zero gradient). softcap > 0 caps the logits
    first (`soft_cap`); 0: off.
    With top_k > 0 or top_p < 1 (or a given `support_threshold` (...), in z = soft_cap(logits) * (1 / temperature)
    units) the distribution is the truncated one: tokens with z < thr are cut (-inf) except the label, then
    renormalised.
    """
    z = soft_cap(logits.to(_compute_dtype(logits)), softcap) / temperature  # (..., V)
    if support_threshold is not None or _truncated(logits.shape[-1], top_k, top_p):
        thr = support_threshold
        if thr is None:
            thr = _support_threshold(logits.detach(), temperature=temperature, top_k=top_k, top_p=top_p,
                                     softcap=softcap)
        zk = soft_cap(logits.detach().to(z.dtype), softcap) * (1.0 / temperature)  # the units of thr (the kernels' z)
        cols = torch.arange(z.shape[-1], device=z.device)
        z = z.masked_fill((zk < thr.to(z.dtype).unsqueeze(-1)) & (cols != labels.unsqueeze(-1)), float("-inf"))
    logp_all = z.log_softmax(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (...)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(p))  # 0 * -inf would be NaN (also in backward)
    entropy = torch.where(valid, -plogp.sum(-1), torch.zeros_like(logp))
    return logp, entropy


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, support_threshold: torch.Tensor | None = None, ignore_index: int = -100,
                          return_entropy: bool = False, softcap: float = 0.0):
    """`token_logprobs(hidden @ weight.T + bias, labels)`, materialising the full logits (the naive path).

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...). Same outputs as `token_logprobs`.
    """
    logits = hidden @ weight.t()  # (..., V)
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, labels, temperature=temperature, top_k=top_k, top_p=top_p,
                          support_threshold=support_threshold, ignore_index=ignore_index,
                          return_entropy=return_entropy, softcap=softcap)


def ppo_loss_from_hidden(hidden, weight, labels, old_logp, advantages, mask, *, bias=None,
                         clip: PPOClip = PPOClip(), agg: PPOAgg | str = "token-mean", kl: KLTerm | None = None,
                         entropy_coef=0.0, temperature=1.0, is_weights=None, top_k=0, top_p=1.0,
                         support_threshold=None, softcap=0.0):
    """The fused PPO step as a composition: logits -> token_logprobs -> ppo_policy_loss + kl.coef * agg(kl_penalty)
    - entropy_coef * agg(entropy). hidden (batch, T, H), weight (V, H), advantages (batch, T) or (batch,), the rest
    (batch, T). Returns (loss, dict of stats). Defined with the KL/loss references of the next section."""
    agg = PPOAgg.of(agg)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(mask.shape)
    ref_logp = None if kl is None else kl.ref_logp
    finite = torch.isfinite(old_logp) & torch.isfinite(advantages)
    for t in (ref_logp, is_weights):
        if t is not None:
            finite = finite & torch.isfinite(t)
    valid = mask.bool() & finite
    labels = torch.where(valid, labels, torch.full_like(labels, -100))
    logp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, top_k=top_k,
                                      top_p=top_p, support_threshold=support_threshold, return_entropy=True,
                                      softcap=softcap)
    pg, stats = ppo_policy_loss(logp, old_logp, advantages, valid, clip=clip, agg=agg, is_weights=is_weights)
    kl_val = torch.zeros_like(pg)
    if kl is not None:
        kl_val = agg.aggregate(kl_penalty(logp, ref_logp, kl.kind), valid)
    entropy = agg.aggregate(ent, valid)
    loss = pg + (0.0 if kl is None else kl.coef) * kl_val - entropy_coef * entropy
    return loss, dict(policy_loss=pg, kl=kl_val, entropy=entropy, **stats)


# ---------------------------------------------------------------------------------------------------------------
# KL estimators, PPO policy and value losses, masked statistics, token rewards
# ---------------------------------------------------------------------------------------------------------------
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of KL(pi || pi_ref) from sampled log-probs (Schulman, "Approximating KL divergence").

    With lr = clamp(logp - ref_logp, -20, 20):  k1 = lr,  k2 = lr^2 / 2,  k3 = exp(-lr) + lr - 1 = expm1(-lr) + lr,
    abs = |lr|.  Shapes: any, equal; returns the same shape. A NaN log ratio (a NaN input, or two equal infinities)
    gives NaN with zero gradient; an infinite one is clamped to +-20 (zero gradient).
    """
    lr = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return lr
    if kind == "k2":
        return 0.5 * lr * lr
    if kind == "k3":
        return torch.expm1(-lr) + lr
    if kind == "abs":
        return lr.abs()
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask == 1 (over all elements, or along `dim`); 0 where nothing is valid."""
    m = mask.bool()
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = m.sum() if dim is None else m.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over mask == 1 (Bessel-corrected if `unbiased`); 0 when fewer than 2 (1) elements are valid."""
    m = mask.bool()
    n = m.sum().to(x.dtype)
    mean = masked_mean(x, m)
    dev = torch.where(m, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    denom = n - 1 if unbiased else n
    return (dev * dev).sum() / denom.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over mask == 1 (var unbiased); masked positions are set to 0. A NaN/Inf x at a
    valid position is left out of mean and var (and stays non-finite in the output).

    With `shift_mean=False` the mean is added back (scale only), as TRL does for advantages.
    """
    m = mask.bool()
    stat = m & torch.isfinite(x)
    mean, var = masked_mean(x, stat), masked_var(x, stat)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=x.dtype, device=x.device))


def _finite_valid(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, nonfinite): valid = mask & every tensor finite; nonfinite = count of masked-in non-finite tokens."""
    m = mask.bool()
    finite = torch.ones_like(m)
    for t in tensors:
        finite = finite & torch.isfinite(t)
    return m & finite, (m & ~finite).sum()


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip: PPOClip = PPOClip(),
                    agg: PPOAgg | str = "token-mean", is_weights=None):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), optional dual clip (Ye et al. 2020), all (batch, T);
    advantages (batch, T) or (batch,) (broadcast over each row), is_weights (batch, T) or None.

    token level: r = exp(clamp(logp - old_logp, -20, 20)); sequence level (GSPO, Zheng et al. 2025, the stop-gradient
    form): log r_t = sg[mean_valid(logp - old_logp)] + logp_t - sg[logp_t]; sequence-sum: log r = sum_valid(logp -
    old_logp) with its full gradient; clamped likewise.
    l = w_is * max(-A r, -A clip(r, clip.lower, clip.upper)); for A < 0 with clip.dual c: l = w_is * min(.., -c A);
    reduced by `agg.aggregate`. Tokens with a non-finite input (is_weights included) are dropped (counted in stats).
    Returns (loss, dict of stats: clip_frac, approx_kl = mean(r - 1 - log r), ratio_mean/min/max, nonfinite).
    """
    agg = PPOAgg.of(agg)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    extra = () if is_weights is None else (is_weights,)
    valid, nonfinite = _finite_valid(mask, logp, old_logp, advantages, *extra)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lr = torch.where(valid, logp - old_logp, zero)
    if clip.level == "sequence":
        seq = lr.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)  # (batch, 1)
        lr = torch.where(valid, logp - logp.detach() + seq.detach(), zero)
    elif clip.level == "sequence-sum":  # the likelihood ratio of the whole sequence, differentiated through the sum
        lr = torch.where(valid, lr.sum(-1, keepdim=True).expand_as(lr), zero)
    lr = lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = torch.where(valid, advantages, zero)
    ratio = torch.exp(lr)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(clip.lower, clip.upper)
    tok = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if clip.dual is not None:
        pg3 = -adv * clip.dual
        dual = (adv < 0) & (pg3 < tok)
        tok = torch.where(adv < 0, torch.minimum(tok, pg3), tok)
        clipped = clipped | dual
    if is_weights is not None:
        tok = tok * torch.where(valid, is_weights.detach(), zero)
    loss = agg.aggregate(tok, valid)
    with torch.no_grad():
        any_valid = valid.any()
        one = torch.ones((), dtype=logp.dtype, device=logp.device)
        stats = dict(
            clip_frac=masked_mean(clipped.to(logp.dtype), valid),
            approx_kl=masked_mean(torch.expm1(lr) - lr, valid),
            ratio_mean=torch.where(any_valid, masked_mean(ratio, valid), one),
            ratio_min=torch.where(any_valid, torch.where(valid, ratio, torch.inf).min(), one) if ratio.numel() else one,
            ratio_max=torch.where(any_valid, torch.where(valid, ratio, -torch.inf).max(), one) if ratio.numel() else one,
            nonfinite=nonfinite,
        )
    return loss, stats


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg: PPOAgg | str = "token-mean"):
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2) (PPO2 baselines), (batch, T).

    `clip=None` disables clipping. Returns (loss, dict of stats: clip_frac, explained_variance = 1 - Var[R - v] /
    Var[R] (0 when Var[R] == 0), value_mean, return_mean, nonfinite).
    """
    valid, nonfinite = _finite_valid(mask, values, old_values, returns)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v, vo, ret = (torch.where(valid, t, zero) for t in (values, old_values, returns))
    l1 = (v - ret) ** 2
    if clip is None:
        tok, clipped = 0.5 * l1, torch.zeros_like(valid)
    else:
        vc = vo + (v - vo).clamp(-clip, clip)
        l2 = (vc - ret) ** 2
        tok, clipped = 0.5 * torch.maximum(l1, l2), (l2 > l1) & ((v - vo).abs() > clip)
    loss = PPOAgg.of(agg).aggregate(tok, valid)
    with torch.no_grad():
        var_r = masked_var(ret, valid)
        ev = torch.where(var_r > 0, 1 - masked_var(ret - v, valid) / torch.where(var_r > 0, var_r, 1), zero)
        stats = dict(clip_frac=masked_mean(clipped.to(values.dtype), valid), explained_variance=ev,
                     value_mean=masked_mean(v, valid), return_mean=masked_mean(ret, valid), nonfinite=nonfinite)
    return loss, stats


def token_rewards(scores, logp, ref_logp, mask, *, kl_coef, kind="k1"):
    """InstructGPT per-token reward (Ouyang et al. 2022, eq. 2): -kl_coef * kl_t on every valid token plus the
    scalar score (batch,) on each sequence's last valid token; 0 on masked tokens and on empty rows. (batch, T)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    r = torch.where(m, -kl_coef * kl_penalty(logp, ref_logp, kind), zero)
    if m.shape[-1] == 0:
        return r
    pos = torch.arange(m.shape[-1], device=m.device)
    last = torch.where(m, pos, -1).max(-1).values  # (batch,) index of the last valid token, -1 if none
    at_last = (pos == last[:, None]) & m
    return r + torch.where(at_last, scores[:, None].to(r.dtype), zero)


def rollout_correction(trainer_logp, rollout_logp, mask, correction: RolloutCorrection = RolloutCorrection()):
    """`ops.rollout_correction` one row at a time, in the inputs' dtype (modes: `RolloutCorrection`), (batch, T).

    Returns (is_weights or None, keep mask (bool), dict of stats: k3_kl, max_abs_dlogp, outside_10pct, outside_1pct,
    masked_frac, masked_seq_frac, weight_mean, nonfinite), all over the valid tokens with finite log-probs."""
    mode, lo, hi = correction.mode, *correction.bounds
    m = mask.bool()
    valid = m & torch.isfinite(trainer_logp) & torch.isfinite(rollout_logp)
    weights = torch.zeros_like(trainer_logp)
    keep = m.clone() if mode == "none" else valid.clone()
    out = torch.zeros_like(valid)  # tokens taken out of the gradient
    for b in range(m.shape[0]):
        v = valid[b]
        lr = trainer_logp[b][v] - rollout_logp[b][v]  # (n_b,) log w of the row's tokens
        if correction.level == "sequence":  # W = exp(sum lr), geo_mask: G = exp(mean lr), on every token
            lr = (lr.mean() if mode == "geo_mask" else lr.sum()).expand_as(lr)
        r = torch.exp(lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        inside = (r >= lo) & (r <= hi)
        if mode == "tis":
            weights[b, v] = r.clamp(lo, hi)
        elif mode == "icepop":
            weights[b, v] = torch.where(inside, r, torch.zeros_like(r))
        if mode in ("mis", "icepop", "geo_mask"):
            out[b, v] = ~inside
        if mode in ("mis", "geo_mask"):
            keep[b, v] = inside
    lr = (trainer_logp - rollout_logp)[valid]  # (n,)
    lrc = lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = torch.exp(lrc)
    zero, one = (torch.full((), v, dtype=lr.dtype, device=lr.device) for v in (0.0, 1.0))
    mean = lambda x: x.to(lr.dtype).mean() if x.numel() else zero  # noqa: E731
    has_weights = mode in ("tis", "icepop")
    stats = dict(k3_kl=mean(torch.expm1(lrc) - lrc), max_abs_dlogp=lr.abs().max() if lr.numel() else zero,
                 outside_10pct=mean((w < 0.9) | (w > 1.1)), outside_1pct=mean((w < 0.99) | (w > 1.01)),
                 masked_frac=mean(out[valid]), masked_seq_frac=mean(out.any(-1)[valid.any(-1)]),
                 weight_mean=mean(weights[keep & valid]) if has_weights and (keep & valid).any() else one,
                 nonfinite=(m & ~valid).sum())
    return (weights if has_weights else None), keep, stats


# ---------------------------------------------------------------------------------------------------------------
# Generalized advantage estimation
# ---------------------------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, eq. 16) as the reversed loop TRL/verl/OpenRLHF use; (batch, T) each.

    For a valid t with next valid position n (none: V_n = A_n = 0): delta_t = r_t + gamma V_n - V_t,
    A_t = delta_t + gamma lam A_n. A masked t adds nothing and carries A over: A_t = A_{t+1} (A after the last
    valid token is 0). returns = advantages + values everywhere.
    """
    m = mask.bool()
    next_v = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    adv = torch.empty_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * last
        last = torch.where(m[:, t], a, last)
        next_v = torch.where(m[:, t], values[:, t], next_v)
        adv[:, t] = last
    return adv, adv + values


def gae_packed(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, *,
               gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae` on packed 1-D streams (total,): sequence i is [cu_seqlens[i], cu_seqlens[i+1])."""
    adv, ret = torch.empty_like(values), torch.empty_like(values)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            a, r = gae(rewards[None, s:e], values[None, s:e], mask[None, s:e], gamma=gamma, lam=lam)
            adv[s:e], ret[s:e] = a[0], r[0]
    return adv, ret


# ---------------------------------------------------------------------------------------------------------------
# Paged KV cache and paged-attention decode
# ---------------------------------------------------------------------------------------------------------------

def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, sliding_window: int = 0, softcap: float = 0.0,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row over its cached keys (grouped-query: head h reads kv head h // (H // KVH)).

    q (B, H, D); k_cache, v_cache (num_blocks, block_size, KVH, D); block_tables (B, max_blocks) int32;
    context_lens (B,) int32, >= 1. Row b's query sits at position n - 1 (n = context_lens[b]) and attends to its
    tokens t in [lo, n), token t living in slot t % block_size of block block_tables[b, t // block_size]; lo = 0, or
    max(0, n - sliding_window) with a window (the last W keys, itself included: key t > query - W, as transformers'
    `sliding_window_overlay`). Scores s = scale <q, k>, soft-capped to softcap * tanh(s / softcap) when softcap > 0
    (Gemma 2); sinks (H,): one extra logit per head in the softmax's denominator with no value (GPT-OSS):
    out = sum_t exp(s_t) v_t / (exp(sink) + sum_t exp(s_t)). Returns (B, H, D) in q's dtype, computed in fp32
    (fp64 for fp64 inputs), one query at a time (so a row never depends on the rest of the batch).
    """
    b_, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    for b in range(b_):
        n = int(context_lens[b])
        lo = max(0, n - sliding_window) if sliding_window > 0 else 0
        blocks = block_tables[b, lo // bs: -(-n // bs)].long()  # entries before the window are never read
        k = k_cache[blocks].reshape(-1, kvh, d)[lo % bs: lo % bs + n - lo].to(cdt)  # (n - lo, KVH, D)
        v = v_cache[blocks].reshape(-1, kvh, d)[lo % bs: lo % bs + n - lo].to(cdt)
        qb = q[b].to(cdt).view(kvh, h // kvh, d)  # (KVH, G, D)
        s = torch.einsum("kgd,nkd->kgn", qb, k) * scale  # (KVH, G, n - lo)
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        if sinks is not None:  # the sink's column joins the softmax, then is dropped
            s = torch.cat((s, sinks.to(cdt).view(kvh, h // kvh, 1)), dim=-1)
        w = torch.softmax(s, dim=-1)[..., : n - lo]
        o = torch.einsum("kgn,nkd->kgd", w, v)  # (KVH, G, D)
        out[b] = o.reshape(h, d).to(q.dtype)
    return out


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write k, v (T, KVH, D) into the caches (num_blocks, block_size, KVH, D) at flat slots slot_mapping (T,)
    (slot = block * block_size + offset); negative slots are skipped (padding)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy-on-write: kv_cache (layers, 2, num_blocks, ...) gets block src[i] copied over block dst[i], every layer."""
    kv_cache[:, :, dst.long()] = kv_cache[:, :, src.long()]


# ---------------------------------------------------------------------------------------------------------------
# Group advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline)
# ---------------------------------------------------------------------------------------------------------------

def weighted_whiten(x: torch.Tensor, w: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) with weights w >= 0: mu = sum w x / sum w, var = sum w (x - mu)^2 / (sum w - 1)
    (0 when sum w <= 1). With w = a row's valid-token count this is `masked_whiten` of x broadcast over tokens."""
    total = w.sum()
    mu = (w * x).sum() / total.clamp(min=1e-30)
    var = torch.where(total > 1, (w * (x - mu) ** 2).sum() / (total - 1).clamp(min=1e-30), torch.zeros_like(total))
    return (x - mu) * torch.rsqrt(var + eps)


def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mode: str = "grpo", *, scale: str = "group",
                     eps: float = 1e-6, weights: torch.Tensor | None = None, keep_singletons: bool = False):
    """`rlhf_fast.ops.group_advantages` as one Python loop over the groups (formulas in rlhf_fast/ops/advantages.py).

    scores (B,) float, group_ids (B,) int, weights (B,) or None (reinforce_pp_baseline's whitening weights).
    Returns (advantages (B,), group_mean (G,), group_std (G,), group_count (G,)), groups in ascending id order,
    all in the scores' dtype (count int64).
    """
    ids = group_ids.tolist()
    groups = sorted(set(ids))
    adv = torch.zeros_like(scores)
    mean = torch.zeros(len(groups), dtype=scores.dtype)
    std = torch.zeros(len(groups), dtype=scores.dtype)
    count = torch.zeros(len(groups), dtype=torch.int64)
    batch_std = scores.std() if scores.numel() > 1 else torch.zeros((), dtype=scores.dtype)
    for k, g in enumerate(groups):
        rows = torch.tensor([i for i, x in enumerate(ids) if x == g])
        s = scores[rows]
        n = len(rows)
        mean[k], count[k] = s.mean(), n
        std[k] = s.std() if n > 1 else 0.0
        if n == 1:
            centred = s if keep_singletons else torch.zeros_like(s)
            group_std = torch.ones_like(std[k]) if keep_singletons else std[k]
        else:
            centred, group_std = s - mean[k], std[k]
        if mode == "grpo":
            denom = {"group": group_std + eps, "batch": batch_std + eps, "none": torch.ones_like(std[k])}[scale]
            adv[rows] = centred / denom
        elif mode == "rloo":
            adv[rows] = centred * n / (n - 1) if n > 1 else centred
        elif mode == "reinforce_pp_baseline":
            adv[rows] = centred
        else:
            raise ValueError(f"unknown mode {mode!r}")
    if mode == "reinforce_pp_baseline" and scores.numel():
        adv = weighted_whiten(adv, torch.ones_like(adv) if weights is None else weights.to(adv.dtype))
    return adv, mean, std, count
