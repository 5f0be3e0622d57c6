// Token log-probabilities and entropy on CPU: one online-softmax pass over each row of logits (forward) and one
// pass writing dlogits (backward). Rows run in parallel (OpenMP); within a row the vocabulary is visited in a fixed
// order of BLOCK-sized blocks, so a row's result is bitwise independent of the batch, its position and the thread
// count. Python side: rlhf_fast/ops/logprobs.py (checks, custom ops, autograd).
//
// Notation: z = x * inv_temp (x the logits), p = softmax(z), lse = logsumexp(z), logp = z[y] - lse,
// H = -sum p log p = lse - E_p[z].  Backward (derivation in triton-kernels/logprobs.py):
//   dz_j = g * (1[j == y] - p_j) - gH * p_j * (z_j - E_p[z]),   dx_j = dz_j * inv_temp.
// Truncated support (top-k / top-p): a per-row threshold thr (or none) keeps z_j >= thr and the label; the other
// entries are -inf in z, so they drop out of lse, logp and H and get dz_j = 0 (p_j = 0). thr = -inf keeps all,
// bitwise as without it. `support_threshold_cpu` below finds thr (the selection pass: bisection on the bits).
// Final logit soft-cap c > 0 (Gemma 2/3): z = c tanh(x / c) * inv_temp (capped before the temperature, as
// transformers does), so dx_j = dz_j * inv_temp * (1 - tanh^2(x_j / c)); the threshold is on the capped z. c = 0:
// the same code as without it (a separate instantiation, bitwise unchanged).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "registry.h"

// Comparisons may not trap here, which lets GCC turn the selects of the inner loops into SIMD blends.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
// The build targets x86-64-v2 (SSE4.2); the row loops are also compiled for AVX2 and AVX-512 and picked at load time.
// Each clone sums in its own (fixed) order: results are bitwise reproducible on a given machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RLHF_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RLHF_FAST_SIMD_CLONES
#endif

namespace rlhf_fast {
namespace {

constexpr int BLOCK = 256;  // vocabulary block: the unit of the fixed reduction order

struct F32 { using T = float; static float load(T v) { return v; } static T store(float f) { return f; } };
struct F64 { using T = double; static double load(T v) { return v; } static T store(double f) { return f; } };
// 16-bit loads written branch-free (same results as common.h's converters) so that the block loads vectorise.
inline float bits_to_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
struct BF16 {
  using T = std::uint16_t;
  static float load(T v) { return bits_to_float(static_cast<std::uint32_t>(v) << 16); }
  static T store(float f) {  // round to nearest even, NaN stays NaN (as float_to_bf16)
    std::uint32_t b;
    std::memcpy(&b, &f, 4);
    const std::uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return static_cast<T>((b & 0x7fffffffu) > 0x7f800000u ? ((b >> 16) | 0x40u) : rounded);
  }
};
struct FP16 {
  using T = std::uint16_t;
  static float load(T v) {
    const std::uint32_t bits = v, em = bits & 0x7fffu, sign = (bits & 0x8000u) << 16;
    // exponent and mantissa shifted into float position, rescaled by 2^(127 - 15): exact for normals and subnormals
    const float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;
    const float special = bits_to_float((em << 13) | 0x7f800000u);  // inf / nan
    const float r = em >= 0x7c00u ? special : mag;
    std::uint32_t rb;
    std::memcpy(&rb, &r, 4);
    return bits_to_float(rb | sign);
  }
  static T store(float f) {  // round to nearest even; all three cases computed, then selected (as float_to_fp16)
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    const std::uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    const std::uint32_t special = ax > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan / overflow to inf
    float sub_f = bits_to_float(ax < 0x38800000u ? ax : 0u) + 0.5f;  // the add rounds to the fp16 subnormal grid
    std::uint32_t sub;
    std::memcpy(&sub, &sub_f, 4);
    sub -= 0x3f000000u;
    const std::uint32_t normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;  // rebias exponent, round
    const std::uint32_t h = ax >= 0x47800000u ? special : (ax < 0x38800000u ? sub : normal);
    return static_cast<T>(sign | h);
  }
};

// exp(x) for x <= 0 (and small positive x) in a form the compiler vectorises: x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by its degree-7 Taylor polynomial (relative error < 1e-8), 2^n through the exponent bits. Returns exactly 0
// below -87.3 (where exp underflows float's normal range), including x = -inf.
inline float exp_nonpos(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 80.0f ? 80.0f : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  std::int32_t ti, si;
  std::memcpy(&ti, &t, 4);
  si = (ti - 0x4B400000 + 127) << 23;  // n + 127 in the exponent field
  float scale;
  std::memcpy(&scale, &si, 4);
  const float keep = x < -87.3f ? 0.0f : 1.0f;
  return p * scale * keep;
}
inline double exp_nonpos(double x) { return std::exp(x); }

template <typename F>
inline F clamp_low(F d) {  // keeps e * d finite when e == 0
  return d < static_cast<F>(-88) ? static_cast<F>(-88) : d;
}

// tanh(y), with its derivative 1 - tanh^2(y) in *d, branch-free so that the block loops vectorise (selects only:
// std::fabs / std::copysign keep GCC 12 from vectorising). For a = |y| >= 0.25: tanh(a) = (1 - e) / (1 + e) and
// 1 - tanh^2(a) = 4 e / (1 + e)^2 with e = exp(-2a) <= 0.61 (no cancellation; exp_nonpos: relative error < 1e-8);
// below 0.25 the odd Taylor polynomial to y^9 (truncation < 1e-8 relative). At most 3 ulp from tanh (checked
// against double over [-10, 10] and 2^-30..1); +-inf gives +-1 (derivative 0), NaN stays NaN.
inline float tanh_d(float y, float* d) {
  const float a = y < 0.0f ? -y : y, y2 = y * y;
  const float e = exp_nonpos(-2.0f * a), ope = 1.0f + e;
  const float poly = -1.0f / 3.0f + y2 * (2.0f / 15.0f + y2 * (-17.0f / 315.0f + y2 * (62.0f / 2835.0f)));
  const float small = a + a * y2 * poly;
  const bool near0 = a < 0.25f;
  const float t = near0 ? small : (1.0f - e) / ope;
  *d = near0 ? 1.0f - small * small : 4.0f * e / (ope * ope);
  return y < 0.0f ? -t : t;
}
inline float tanh_of(float y) {  // the same value as tanh_d's (the derivative is dead code here)
  float d;
  return tanh_d(y, &d);
}
inline double tanh_d(double y, double* d) {
  const double ch = std::cosh(y);
  *d = 1.0 / (ch * ch);
  return std::tanh(y);
}
inline double tanh_of(double y) { return std::tanh(y); }

// The logits' map before the temperature: none (NoCap), or the soft-cap x -> c tanh(x / c) (SoftCap), with its
// derivative d cap / dx = 1 - tanh^2(x / c) in *d. The row kernels and the selection pass share it, so a threshold
// is a value of the kernels' own z.
template <typename F>
struct NoCap {
  static constexpr bool on = false;
  F operator()(F x) const { return x; }
};
template <typename F>
struct SoftCap {
  static constexpr bool on = true;
  F c, inv_c;
  F operator()(F x) const { return c * tanh_of(x * inv_c); }
  F operator()(F x, F* d) const { return c * tanh_d(x * inv_c, d); }
};

// buf[0..nb) = z of the block at v0, -inf where z < thr except at column `keep` (the label; -1: none).
template <typename In, typename F, typename Cap>
inline void load_masked(const typename In::T* x, std::int64_t v0, int nb, F inv_t, Cap cap, F thr, std::int64_t keep,
                        F* buf) {
  for (int j = 0; j < nb; ++j) {
    const F z = cap(static_cast<F>(In::load(x[v0 + j]))) * inv_t;
    buf[j] = z < thr ? -std::numeric_limits<F>::infinity() : z;
  }
  if (keep >= v0 && keep < v0 + nb) buf[keep - v0] = cap(static_cast<F>(In::load(x[keep]))) * inv_t;
}

// As load_masked with the soft-cap, and dcap[0..nb) = d cap / dx of each entry (the backward's chain-rule factor).
template <typename In, typename F>
inline void load_masked_d(const typename In::T* x, std::int64_t v0, int nb, F inv_t, SoftCap<F> cap, F thr,
                          std::int64_t keep, F* buf, F* dcap) {
  for (int j = 0; j < nb; ++j) {
    const F z = cap(static_cast<F>(In::load(x[v0 + j])), dcap + j) * inv_t;
    buf[j] = z < thr ? -std::numeric_limits<F>::infinity() : z;
  }
  if (keep >= v0 && keep < v0 + nb) buf[keep - v0] = cap(static_cast<F>(In::load(x[keep]))) * inv_t;
}

// Forward of one row: writes logp, lse, entropy (in the compute type F).
template <typename In, typename F, typename Cap>
RLHF_FAST_SIMD_CLONES void row_fwd(const typename In::T* x, std::int64_t v, F inv_t, Cap cap, F thr,
                                   std::int64_t label, bool valid, F* logp, F* lse, F* ent) {
  F buf[BLOCK];
  F m = -std::numeric_limits<F>::infinity();
  double s = 0.0, t = 0.0;  // s = sum exp(z - m), t = sum exp(z - m) * (z - m)
  for (std::int64_t v0 = 0; v0 < v; v0 += BLOCK) {
    const int nb = static_cast<int>(std::min<std::int64_t>(BLOCK, v - v0));
    F bm = -std::numeric_limits<F>::infinity();
    load_masked<In, F>(x, v0, nb, inv_t, cap, thr, valid ? label : -1, buf);
#pragma omp simd reduction(max : bm)
    for (int j = 0; j < nb; ++j) bm = buf[j] > bm ? buf[j] : bm;
    if (bm > m) {
      if (s > 0.0) {
        const double sc = std::exp(static_cast<double>(m) - static_cast<double>(bm));
        t = sc * (t + (static_cast<double>(m) - static_cast<double>(bm)) * s);
        s *= sc;
      }
      m = bm;
    }
    if (!(m > -std::numeric_limits<F>::infinity())) continue;  // only -inf so far
    F sb = 0, tb = 0;
#pragma omp simd reduction(+ : sb, tb)
    for (int j = 0; j < nb; ++j) {
      const F d = clamp_low(buf[j] - m);
      const F e = exp_nonpos(buf[j] - m);
      sb += e;
      tb += e * d;
    }
    s += sb;
    t += tb;
  }
  const double row_lse = static_cast<double>(m) + std::log(s);
  *lse = static_cast<F>(row_lse);
  if (!valid) {
    *logp = 0;
    *ent = 0;
    return;
  }
  const double zy = static_cast<double>(cap(static_cast<F>(In::load(x[label]))) * inv_t);
  *logp = static_cast<F>(zy - row_lse);
  *ent = static_cast<F>(std::log(s) - t / s);
}

// Backward of one row: writes dlogits into out (may alias x: each element is read before it is written).
template <typename In, typename F, typename Cap>
RLHF_FAST_SIMD_CLONES void row_bwd(const typename In::T* x, typename In::T* out, std::int64_t v, F inv_t, Cap cap,
                                   F thr, std::int64_t label, bool valid, F lse, F ent, F g, F gh) {
  if (!valid) {
    for (std::int64_t j = 0; j < v; ++j) out[j] = In::store(0);
    return;
  }
  const F mean_z = lse - ent;  // E_p[z]
  F buf[BLOCK];
  F dcap[Cap::on ? BLOCK : 1];
  for (std::int64_t v0 = 0; v0 < v; v0 += BLOCK) {
    const int nb = static_cast<int>(std::min<std::int64_t>(BLOCK, v - v0));
    if constexpr (Cap::on) {
      load_masked_d<In, F>(x, v0, nb, inv_t, cap, thr, label, buf, dcap);
    } else {
      load_masked<In, F>(x, v0, nb, inv_t, cap, thr, label, buf);
    }
#pragma omp simd
    for (int j = 0; j < nb; ++j) {
      const F p = exp_nonpos(buf[j] - lse);
      const F centred = p * (clamp_low(buf[j] - lse) + lse - mean_z);  // p * (z - E[z]), 0 where p == 0
      buf[j] = -(p * g + centred * gh) * inv_t;
    }
    if (label >= v0 && label < v0 + nb) buf[label - v0] += g * inv_t;
    if constexpr (Cap::on) {  // the chain rule through the cap
#pragma omp simd
      for (int j = 0; j < nb; ++j) buf[j] *= dcap[j];
    }
    for (int j = 0; j < nb; ++j) out[v0 + j] = In::store(buf[j]);
  }
}

template <typename In, typename F, typename Cap>
void fwd_rows(std::uintptr_t logits, std::uintptr_t labels, std::int64_t n, std::int64_t v, double inv_temp, Cap cap,
              std::int64_t ignore_index, std::uintptr_t thr, std::uintptr_t logp, std::uintptr_t lse,
              std::uintptr_t ent) {
  const auto* x = ptr<const typename In::T>(logits);
  const F* th = thr ? ptr<const F>(thr) : nullptr;
  const auto* y = ptr<const std::int64_t>(labels);
  F* lp = ptr<F>(logp);
  F* ls = ptr<F>(lse);
  F* en = ptr<F>(ent);
#pragma omp parallel for schedule(static) num_threads(max_threads())
  for (std::int64_t i = 0; i < n; ++i) {
    const bool valid = y[i] != ignore_index;
    const F t = th ? th[i] : -std::numeric_limits<F>::infinity();
    row_fwd<In, F>(x + i * v, v, static_cast<F>(inv_temp), cap, t, valid ? y[i] : 0, valid, lp + i, ls + i,
                   en + i);
  }
}

template <typename In, typename F, typename Cap>
void bwd_rows(std::uintptr_t logits, std::uintptr_t labels, std::int64_t n, std::int64_t v, double inv_temp, Cap cap,
              std::int64_t ignore_index, std::uintptr_t thr, std::uintptr_t lse, std::uintptr_t ent,
              std::uintptr_t dlogp, std::uintptr_t dent, std::uintptr_t dlogits) {
  const auto* x = ptr<const typename In::T>(logits);
  const F* th = thr ? ptr<const F>(thr) : nullptr;
  auto* out = ptr<typename In::T>(dlogits);
  const auto* y = ptr<const std::int64_t>(labels);
  const F* ls = ptr<const F>(lse);
  const F* en = ptr<const F>(ent);
  const F* g = ptr<const F>(dlogp);
  const F* gh = ptr<const F>(dent);
#pragma omp parallel for schedule(static) num_threads(max_threads())
  for (std::int64_t i = 0; i < n; ++i) {
    const bool valid = y[i] != ignore_index;
    const F t = th ? th[i] : -std::numeric_limits<F>::infinity();
    row_bwd<In, F>(x + i * v, out + i * v, v, static_cast<F>(inv_temp), cap, t, valid ? y[i] : 0, valid, ls[i],
                   en[i], g[i], gh[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Selection pass: a row's support threshold under top-k / top-p, exactly, by bisection over the bits of z.
//   top-k: thr_k = the k-th largest z (ties with it kept): the largest t with count(z >= t) >= k.
//   top-p: over the tokens with z >= thr_k and p their softmax, the largest t with mass(z >= t) >= top_p: the
//          smallest nucleus that reaches top_p, with the token that crosses it (and its ties).
// Both predicates are monotone in t and change only at values of z, so bisecting on an order-preserving integer
// key of z (at most 32 steps for float, 64 for double) ends exactly on a value of the row. top-k stops early once
// exactly k tokens are >= the midpoint (their smallest is the k-th); top-p then runs over the kept tokens only.
// ---------------------------------------------------------------------------------------------------------------

template <typename F> struct KeyOf;
template <> struct KeyOf<float> { using I = std::int32_t; using U = std::uint32_t; };
template <> struct KeyOf<double> { using I = std::int64_t; using U = std::uint64_t; };

template <typename F>
inline typename KeyOf<F>::I float_key(F z) {  // key(a) < key(b) iff a < b (and -0 < +0)
  using I = typename KeyOf<F>::I;
  I b;
  std::memcpy(&b, &z, sizeof b);
  return b >= 0 ? b : static_cast<I>(b ^ std::numeric_limits<I>::max());
}

template <typename F>
inline F key_float(typename KeyOf<F>::I k) {
  using I = typename KeyOf<F>::I;
  const I b = k >= 0 ? k : static_cast<I>(k ^ std::numeric_limits<I>::max());
  F z;
  std::memcpy(&z, &b, sizeof z);
  return z;
}

template <typename F>
inline typename KeyOf<F>::I upper_mid(typename KeyOf<F>::I lo, typename KeyOf<F>::I hi) {  // lo < hi, no overflow
  using U = typename KeyOf<F>::U;
  const U d = static_cast<U>(hi) - static_cast<U>(lo);
  return static_cast<typename KeyOf<F>::I>(static_cast<U>(lo) + d / 2 + (d & 1));
}

// One row: key, e are scratch of v elements. Returns thr (-inf when nothing is cut).
template <typename In, typename F, typename Cap>
RLHF_FAST_SIMD_CLONES F row_threshold(const typename In::T* x, std::int64_t v, F inv_t, Cap cap, std::int64_t top_k,
                                      double top_p, typename KeyOf<F>::I* key, F* e) {
  using I = typename KeyOf<F>::I;
  const bool use_k = top_k > 0 && top_k < v, use_p = top_p < 1.0;
  if (!use_k && !use_p) return -std::numeric_limits<F>::infinity();
  I kmin = std::numeric_limits<I>::max(), kmax = std::numeric_limits<I>::min();
  for (std::int64_t j = 0; j < v; ++j) {
    const I k = float_key(cap(static_cast<F>(In::load(x[j]))) * inv_t);
    key[j] = k;
    kmin = k < kmin ? k : kmin;
    kmax = k > kmax ? k : kmax;
  }
  I lo = kmin;
  if (use_k) {
    I hi = kmax;
    while (lo < hi) {
      const I mid = upper_mid<F>(lo, hi);
      std::int64_t c = 0;
      I above = std::numeric_limits<I>::max();  // the smallest key >= mid
      for (std::int64_t v0 = 0; v0 < v; v0 += BLOCK) {  // per block: counts and keys in the key's own width (SIMD)
        const int nb = static_cast<int>(std::min<std::int64_t>(BLOCK, v - v0));
        I cb = 0, ab = std::numeric_limits<I>::max();
#pragma omp simd reduction(+ : cb) reduction(min : ab)
        for (int j = 0; j < nb; ++j) {
          const I kj = key[v0 + j];
          cb += kj >= mid ? I(1) : I(0);
          const I cand = kj >= mid ? kj : std::numeric_limits<I>::max();
          ab = cand < ab ? cand : ab;
        }
        c += cb;
        above = ab < above ? ab : above;
      }
      if (c == top_k) {  // exactly the k largest are >= mid: the k-th is their smallest (about half the steps)
        lo = above;
        break;
      }
      if (c >= top_k) lo = mid; else hi = mid - 1;
    }
  }
  const F mx = key_float<F>(kmax);
  if (use_p && mx > -std::numeric_limits<F>::infinity() && mx < std::numeric_limits<F>::infinity()) {
    // the candidates: every token, or (after top-k) the kept ones packed to the front of key / e (usually ~k)
    std::int64_t nc = v;
    if (use_k) {
      nc = 0;
      for (std::int64_t j = 0; j < v; ++j) {
        if (key[j] < lo) continue;
        key[nc] = key[j];
        e[nc++] = exp_nonpos(cap(static_cast<F>(In::load(x[j]))) * inv_t - mx);
      }
    } else {
#pragma omp simd
      for (std::int64_t j = 0; j < v; ++j) e[j] = exp_nonpos(cap(static_cast<F>(In::load(x[j]))) * inv_t - mx);
    }
    double total = 0.0;  // e = exp(z - max) of the candidates; sums: BLOCK lanes, then double, in a fixed order
    for (std::int64_t v0 = 0; v0 < nc; v0 += BLOCK) {
      const int nb = static_cast<int>(std::min<std::int64_t>(BLOCK, nc - v0));
      F sb = 0;
#pragma omp simd reduction(+ : sb)
      for (int j = 0; j < nb; ++j) sb += e[v0 + j];
      total += sb;
    }
    const double target = top_p * total;
    I hi = kmax;
    while (lo < hi) {
      const I mid = upper_mid<F>(lo, hi);
      double mass = 0.0;
      for (std::int64_t v0 = 0; v0 < nc; v0 += BLOCK) {
        const int nb = static_cast<int>(std::min<std::int64_t>(BLOCK, nc - v0));
        F sb = 0;
#pragma omp simd reduction(+ : sb)
        for (int j = 0; j < nb; ++j) sb += key[v0 + j] >= mid ? e[v0 + j] : F(0);
        mass += sb;
      }
      if (mass >= target) lo = mid; else hi = mid - 1;
    }
  }
  return key_float<F>(lo);
}

template <typename In, typename F, typename Cap>
void threshold_rows(std::uintptr_t logits, std::int64_t n, std::int64_t v, double inv_temp, Cap cap,
                    std::int64_t top_k, double top_p, std::uintptr_t thr) {
  const auto* x = ptr<const typename In::T>(logits);
  F* out = ptr<F>(thr);
#pragma omp parallel num_threads(max_threads())
  {
    std::vector<typename KeyOf<F>::I> key(static_cast<std::size_t>(v));
    std::vector<F> e(static_cast<std::size_t>(v));
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i)
      out[i] = row_threshold<In, F>(x + i * v, v, static_cast<F>(inv_temp), cap, top_k, top_p, key.data(),
                                    e.data());
  }
}

void check_sizes(std::int64_t n, std::int64_t v, double softcap) {
  if (n < 0 || v < 1) throw std::invalid_argument("token_logprobs: need n >= 0 rows and v >= 1 columns");
  if (!(softcap >= 0.0) || std::isinf(softcap))
    throw std::invalid_argument("token_logprobs: softcap must be a finite number >= 0 (0: off), got " +
                                std::to_string(softcap));
}

// Calls f(In, F, cap) with the input type of `dtype`, its compute type F and the logits' map: NoCap<F> for
// softcap == 0, else SoftCap<F>{softcap, 1 / softcap}.
template <typename Body>
void dispatch(int dtype, double softcap, const char* name, Body&& f) {
  auto with_cap = [&](auto in, auto compute) {
    using F = decltype(compute);
    if (softcap == 0.0) return f(in, compute, NoCap<F>{});
    return f(in, compute, SoftCap<F>{static_cast<F>(softcap), static_cast<F>(1.0 / softcap)});
  };
  switch (dtype) {
    case kFloat32: return with_cap(F32{}, float{});
    case kFloat64: return with_cap(F64{}, double{});
    case kBFloat16: return with_cap(BF16{}, float{});
    case kFloat16: return with_cap(FP16{}, float{});
  }
  throw std::invalid_argument(std::string(name) + ": unsupported dtype code " + std::to_string(dtype));
}

// logits (n, v) contiguous in `dtype`; labels (n,) int64; softcap c >= 0 (0: off); thr (n,) in the compute type, or
// 0 (no truncation); logp, lse, ent (n,) float32 (float64 for float64 logits).
void token_logprobs_fwd_cpu(std::uintptr_t logits, int dtype, std::uintptr_t labels, std::int64_t n, std::int64_t v,
                            double inv_temp, double softcap, std::int64_t ignore_index, std::uintptr_t thr,
                            std::uintptr_t logp, std::uintptr_t lse, std::uintptr_t ent) {
  check_sizes(n, v, softcap);
  dispatch(dtype, softcap, "token_logprobs_fwd_cpu", [&](auto in, auto compute, auto cap) {
    fwd_rows<decltype(in), decltype(compute)>(logits, labels, n, v, inv_temp, cap, ignore_index, thr, logp, lse, ent);
  });
}

// dlogits (n, v) in `dtype`, may equal logits; softcap, thr as in the forward; lse, ent, dlogp, dent (n,) in the
// compute type.
void token_logprobs_bwd_cpu(std::uintptr_t logits, int dtype, std::uintptr_t labels, std::int64_t n, std::int64_t v,
                            double inv_temp, double softcap, std::int64_t ignore_index, std::uintptr_t thr,
                            std::uintptr_t lse, std::uintptr_t ent, std::uintptr_t dlogp, std::uintptr_t dent,
                            std::uintptr_t dlogits) {
  check_sizes(n, v, softcap);
  dispatch(dtype, softcap, "token_logprobs_bwd_cpu", [&](auto in, auto compute, auto cap) {
    bwd_rows<decltype(in), decltype(compute)>(logits, labels, n, v, inv_temp, cap, ignore_index, thr, lse, ent, dlogp,
                                              dent, dlogits);
  });
}

// logits (n, v) contiguous in `dtype` -> thr (n,) in the compute type (float32; float64 for float64 logits), in
// units of z = cap(logits) * inv_temp (softcap as in the forward); top_k <= 0 or >= v and top_p >= 1 turn each
// part off (-inf: nothing cut).
void support_threshold_cpu(std::uintptr_t logits, int dtype, std::int64_t n, std::int64_t v, double inv_temp,
                           double softcap, std::int64_t top_k, double top_p, std::uintptr_t thr) {
  check_sizes(n, v, softcap);
  dispatch(dtype, softcap, "support_threshold_cpu", [&](auto in, auto compute, auto cap) {
    threshold_rows<decltype(in), decltype(compute)>(logits, n, v, inv_temp, cap, top_k, top_p, thr);
  });
}

}  // namespace

// The forward's log-prob of `label` in one contiguous float32 row (no soft-cap, support z >= thr; -inf: all): the
// value token_logprobs_fwd_cpu writes for that row, bit for bit (the same row kernel). csrc/sampling.cpp's fused
// sampler calls it where the log-probs must be the trainer's op exactly (deterministic mode).
float token_logprob_row_f32(const float* x, std::int64_t v, double inv_temp, float thr, std::int64_t label) {
  float lp, lse, ent;
  row_fwd<F32, float>(x, v, static_cast<float>(inv_temp), NoCap<float>{}, thr, label, true, &lp, &lse, &ent);
  return lp;
}

}  // namespace rlhf_fast

RLHF_FAST_REGISTER(logprobs) {
  namespace py = pybind11;
  m.def("token_logprobs_fwd_cpu", &rlhf_fast::token_logprobs_fwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "Token log-probs, log-sum-exp and entropy of contiguous (n, v) logits (one online-softmax pass per row)");
  m.def("token_logprobs_bwd_cpu", &rlhf_fast::token_logprobs_bwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "dlogits of token_logprobs (may write in place over the logits)");
  m.def("support_threshold_cpu", &rlhf_fast::support_threshold_cpu, py::call_guard<py::gil_scoped_release>(),
        "Per-row top-k / top-p support threshold of contiguous (n, v) logits (bisection on the bits of z)");
}
