"""Triton GAE: one program per sequence, a parallel scan over affine maps per chunk (see csrc/gae_impl.h).

Token t maps the backward-carried state (A, G) (A: advantage of the next valid token, G = gamma lam A +
gamma V of that token) as  valid: (A, G) -> (r - V + G, gamma lam (r - V) + gamma V + gamma lam G),
masked: identity. The maps are affine with an upper triangular matrix, five numbers (p, q, s, u, w) for
(A, G) -> (p A + q G + u, s G + w), and compose associatively, so a chunk of BLOCK tokens is one
`tl.associative_scan`. Chunks are loaded back to front with reversed indices (block position i = time
end - 1 - i), so a forward scan composes later tokens first; the state leaving a chunk is carried into the
next (earlier) one. With `stats`, the program also writes its sequence's (count, mean, M2) of advantages,
which `kernels.whiten.normalize` turns into whitened advantages: 2 launches in all.
"""
from __future__ import annotations

import triton
import triton.language as tl

from rlhf_fast.kernels import whiten as kw
from rlhf_fast.kernels.ppo_losses import _join, split_f64


@triton.jit
def _then(p1, q1, s1, u1, w1, p2, q2, s2, u2, w2):
    """Map 2 after map 1 (map 1 belongs to a later time step)."""
    return p2 * p1, p2 * q1 + q2 * s1, s2 * s1, p2 * u1 + q2 * w1 + u2, s2 * w1 + w2


@triton.jit
def _gae_kernel(R, V, M, CU, ADV, RET, STATS, gamma_hi, gamma_lo, lam_hi, lam_lo, WITH_STATS: tl.constexpr,
                BLOCK: tl.constexpr, ACC: tl.constexpr):
    seq = tl.program_id(0)
    begin, end = tl.load(CU + seq), tl.load(CU + seq + 1)
    i = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], ACC), 0)
    carry_a, carry_g = zero, zero
    n, mean, m2 = zero, zero, zero
    gamma = _join(gamma_hi, gamma_lo, ACC)  # float64 coefficients travel as two float32 halves
    lam = _join(lam_hi, lam_lo, ACC)
    gl = gamma * lam
    for c in range(0, tl.cdiv(end - begin, BLOCK)):
        t = end - 1 - c * BLOCK - i  # (BLOCK,) time indices, decreasing
        inside = t >= begin
        r = tl.load(R + t, mask=inside, other=0).to(ACC)
        v = tl.load(V + t, mask=inside, other=0).to(ACC)
        valid = (tl.load(M + t, mask=inside, other=0) != 0) & inside
        d = r - v
        p = tl.where(valid, 0.0, 1.0).to(ACC)
        q = 1 - p
        s = tl.where(valid, gl, 1.0).to(ACC)
        u = tl.where(valid, d, 0.0).to(ACC)
        w = tl.where(valid, gl * d + gamma * v, 0.0).to(ACC)
        p, q, s, u, w = tl.associative_scan((p, q, s, u, w), 0, _then)
        a = p * carry_a + q * carry_g + u  # advantage at each t
        g = s * carry_g + w
        tl.store(ADV + t, a.to(ADV.dtype.element_ty), mask=inside)
        tl.store(RET + t, (a + v).to(RET.dtype.element_ty), mask=inside)
        last = i == BLOCK - 1  # earliest time of the chunk (identity maps beyond the sequence start)
        carry_a = tl.sum(tl.where(last, a, 0.0), 0)
        carry_g = tl.sum(tl.where(last, g, 0.0), 0)
        if WITH_STATS:
            nb, mb, m2b = kw._block_moments(a, valid)
            n, mean, m2 = kw._chan(n, mean, m2, nb, mb, m2b)
    if WITH_STATS:
        tl.store(STATS + seq * kw.STAT_K + 0, n)
        tl.store(STATS + seq * kw.STAT_K + 1, mean)
        tl.store(STATS + seq * kw.STAT_K + 2, m2)


def gae_scan(rewards, values, mask_u8, cu, adv, ret, gamma: float, lam: float, *, max_len: int,
             whiten: bool = False, eps: float = 1e-8) -> None:
    """Fill adv, ret (total,) from rewards, values (total,), mask (total,) uint8 and cu (num_seqs + 1,) int64.

    `max_len` (the longest sequence) sizes the chunk: min(next power of 2, 1024).

    `whiten=True` then whitens adv over the mask in place (second launch); returns keep the raw advantages.
    """
    n_seq = cu.numel() - 1
    if n_seq == 0 or values.numel() == 0:
        return
    acc = kw.acc_dtype(values)
    stats = kw.stats_buffer(n_seq, values) if whiten else adv
    block = kw.block_for(max_len)
    _gae_kernel[(n_seq,)](rewards, values, mask_u8, cu, adv, ret, stats, *split_f64(gamma), *split_f64(lam),
                          WITH_STATS=whiten, BLOCK=block, ACC=acc)
    if whiten:
        kw.normalize(adv, mask_u8, adv, cu, stats, shift_mean=True, eps=eps, block=block)
