// Paged-attention decode, the algorithm shared by the CPU (csrc/paged_attention.cpp) and CUDA
// (csrc/cuda/paged_attention.cu) kernels: where a token's K/V live, and the online-softmax step.
//
// Cache layout: (num_blocks, block_size, kv_heads, head_dim); a row's token t is in slot t % block_size of block
// table[t / block_size]. For query head h (kv head h / group), with s_t = scale * <q, k_t>:
//   out = sum_t softmax(s)_t v_t, accumulated in one pass over t = 0..n-1 (online softmax):
//   m' = max(m, s_t);  l' = l * exp(m - m') + exp(s_t - m');  acc' = acc * exp(m - m') + exp(s_t - m') v_t
// (per key on CUDA; per cache block of keys on CPU, with m' the max over the block and exp8 for the weights).
// Options (all off by default, and then the computation is exactly the plain one):
//   sliding window W > 0: keys t in [first_key(n, W), n) only, i.e. t > (n - 1) - W, the last W keys (transformers'
//     sliding_window_overlay); blocks before the window are never read (their table entries may be stale);
//   softcap c > 0: s_t -> c tanh(s_t / c) before the softmax (Gemma 2);
//   sinks: one logit per query head in the denominator with no value (GPT-OSS): the state starts at m = sink, l = 1.
// Keys are visited in one fixed order that depends only on n (and block_size, W), so a row never depends on its
// batch.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if !defined(__CUDACC__) && defined(__SSE4_1__)
#include <smmintrin.h>
#endif

#if defined(__CUDACC__)
#define RLHF_PA_HD __host__ __device__ __forceinline__
#else
#define RLHF_PA_HD inline
#endif

namespace rlhf_fast {
namespace paged {

// Element offset of token t's vector for kv head `kvh` in a (num_blocks, block_size, kv_heads, head_dim) cache.
RLHF_PA_HD std::int64_t token_offset(const std::int32_t* table, int t, int block_size, int kv_heads, int head_dim,
                                     int kvh) {
  const std::int64_t block = table[t / block_size];
  return ((block * block_size + t % block_size) * kv_heads + kvh) * static_cast<std::int64_t>(head_dim);
}

RLHF_PA_HD float exp_acc(float x) { return ::expf(x); }
RLHF_PA_HD double exp_acc(double x) { return ::exp(x); }
RLHF_PA_HD float tanh_acc(float x) { return ::tanhf(x); }
RLHF_PA_HD double tanh_acc(double x) { return ::tanh(x); }

// The first key a query at position n - 1 reads: 0 without a window (window <= 0), else max(0, n - window).
RLHF_PA_HD int first_key(int n, int window) { return window > 0 && n > window ? n - window : 0; }

// Gemma 2's logit soft-capping c tanh(s / c); c <= 0: s unchanged.
template <typename Acc>
RLHF_PA_HD Acc soft_cap(Acc s, Acc c) { return c > Acc(0) ? c * tanh_acc(s / c) : s; }

// One online-softmax step for score s: updates the running max m and normaliser l, and returns through `alpha`
// the factor the accumulator is rescaled by and through `p` the weight of the new value.
template <typename Acc>
RLHF_PA_HD void online_step(Acc& m, Acc& l, Acc s, Acc& alpha, Acc& p) {
  const Acc m_new = s > m ? s : m;
  alpha = exp_acc(m - m_new);  // m = -inf on the first key: alpha = 0 (acc and l are 0 anyway)
  p = exp_acc(s - m_new);
  l = l * alpha + p;
  m = m_new;
}

// Indices are 64-bit: Python builds extensions with -fwrapv, under which int index arithmetic blocks vectorisation.
using idx = std::int64_t;

#if !defined(__CUDACC__)  // CPU only from here

// Always inlined: a 32-byte vector passed by value to an out-of-line function would follow a different calling
// convention in the AVX2 kernel than in the baseline code (-Wpsabi).
// The warning is off for every file that includes this one: these never cross a call.
#define RLHF_PA_VEC inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

// Eight floats as one value (GCC/Clang vector extensions: two SSE or one AVX register, plain code elsewhere).
typedef float vf8 __attribute__((vector_size(32)));
typedef std::int32_t vi8 __attribute__((vector_size(32)));

RLHF_PA_VEC vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The first n < 8 of p, the rest `fill`.
RLHF_PA_VEC vf8 load8_tail(const float* p, std::int64_t n, float fill) {
  float buf[8];
  for (std::int64_t j = 0; j < 8; ++j) buf[j] = j < n ? p[j] : fill;
  return load8(buf);
}

RLHF_PA_VEC float sum8(vf8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp(x), eight at a time, branch-free (Cephes expf: Cody-Waite reduction x = n ln2 + r, degree-6 polynomial for
// e^r, 2^n put into the exponent bits); within ~2 ulp of expf. x <= -87.33 (and -inf) give exactly 0; x is clamped
// to 88 above (e^88 ~ 1.6e38). SSE4.1 intrinsics (the compiler scalarises vector-extension selects); std::exp
// lane by lane elsewhere.
#if defined(__SSE4_1__)
RLHF_PA_VEC __m128 exp4(__m128 x) {
  const __m128 lo = _mm_set1_ps(-87.33654f);
  const __m128 xc = _mm_min_ps(_mm_max_ps(x, lo), _mm_set1_ps(88.0f));
  const __m128 n = _mm_round_ps(_mm_mul_ps(xc, _mm_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m128 r = _mm_sub_ps(xc, _mm_mul_ps(n, _mm_set1_ps(0.693359375f)));
  r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(-2.12194440e-4f)));
  __m128 p = _mm_set1_ps(1.9875691500e-4f);
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
  const __m128 y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(p, _mm_mul_ps(r, r)), r), _mm_set1_ps(1.0f));
  const __m128i e = _mm_slli_epi32(_mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127)), 23);
  return _mm_andnot_ps(_mm_cmple_ps(x, lo), _mm_mul_ps(y, _mm_castsi128_ps(e)));
}

RLHF_PA_VEC vf8 exp8(vf8 x) {
  __m128 h[2];
  std::memcpy(h, &x, sizeof x);
  h[0] = exp4(h[0]);
  h[1] = exp4(h[1]);
  std::memcpy(&x, h, sizeof x);
  return x;
}

RLHF_PA_VEC vf8 max8(vf8 a, vf8 b) {  // a > b ? a : b lane by lane
  __m128 ha[2], hb[2];
  std::memcpy(ha, &a, sizeof a);
  std::memcpy(hb, &b, sizeof b);
  ha[0] = _mm_max_ps(ha[0], hb[0]);
  ha[1] = _mm_max_ps(ha[1], hb[1]);
  std::memcpy(&a, ha, sizeof a);
  return a;
}
#else
RLHF_PA_VEC vf8 exp8(vf8 x) {
  for (int j = 0; j < 8; ++j) x[j] = x[j] <= -87.33654f ? 0.0f : std::exp(x[j] < 88.0f ? x[j] : 88.0f);
  return x;
}

RLHF_PA_VEC vf8 max8(vf8 a, vf8 b) {
  for (int j = 0; j < 8; ++j) a[j] = a[j] > b[j] ? a[j] : b[j];
  return a;
}
#endif

// p[0..n) = exp(p[0..n) - mx), returns their sum (lanes j % 8, combined in a fixed order).
RLHF_PA_VEC float exp_shift_sum(float* p, std::int64_t n, float mx) {
  vf8 acc = vf8{};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const vf8 w = exp8(load8(p + j) - mx);
    std::memcpy(p + j, &w, sizeof w);
    acc += w;
  }
  if (j < n) {
    const vf8 w = exp8(load8_tail(p + j, n - j, -INFINITY) - mx);
    for (std::int64_t i = 0; i < n - j; ++i) p[j + i] = w[i];
    acc += w;
  }
  return sum8(acc);
}
inline double exp_shift_sum(double* p, std::int64_t n, double mx) {
  double sum = 0.0;
  for (std::int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  return sum;
}

// <a, b> over n elements with kLanes independent partial sums (element d goes to lane d % kLanes), combined in a
// fixed order at the end: vectorisable, and the order depends only on n.
constexpr int kLanes = 8;
template <typename Acc>
RLHF_PA_HD Acc dot_lanes(const Acc* __restrict__ a, const Acc* __restrict__ b, idx n) {
  Acc part[kLanes];
  for (idx j = 0; j < kLanes; ++j) part[j] = Acc(0);
  idx d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (idx j = 0; j < kLanes; ++j) part[j] += a[d + j] * b[d + j];
  }
  for (idx j = 0; d + j < n; ++j) part[j] += a[d + j] * b[d + j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// The whole computation for one (row, kv head) on one thread, a cache block of keys at a time (one rescale of the
// accumulator per block): `group` query heads (contiguous, head_dim each, at q) against keys lo..n-1 (the first
// chunk runs from lo to the end of its block); `softcap` > 0 caps the scores; `sinks` (group,) or null. Each key and
// value row is read once for the whole group; caches in Acc's own type are read in place, others converted per block.
// Load(ptr, i) -> Acc reads cache/query elements, Store(ptr, i, Acc) writes out.
// scratch: attend_scratch_size(group, head_dim, block_size) Acc values.
RLHF_PA_HD std::int64_t attend_scratch_size(int group, int head_dim, int block_size) {
  return static_cast<std::int64_t>(2 * group + 2 * block_size) * head_dim + (block_size + 3) * group;
}

template <typename Acc, typename T, typename Load, typename Store>
inline void attend_group(const T* q, const T* k_cache, const T* v_cache, const std::int32_t* table, int n,
                         int block_size, int kv_heads, int head_dim, int kvh, int group, Acc scale, int lo,
                         Acc softcap, const Acc* sinks, T* out, Acc* scratch, Load load, Store store) {
  constexpr bool in_place = std::is_same<T, Acc>::value;
  const idx hd = head_dim, bs = block_size, row = static_cast<idx>(kv_heads) * head_dim;
  Acc* acc = scratch;              // (group, head_dim)
  Acc* qs = acc + group * hd;      // (group, head_dim): the queries, converted once
  Acc* kt = qs + group * hd;       // (block_size, head_dim): this block's keys (converted caches only)
  Acc* vt = kt + bs * hd;          // (block_size, head_dim): and values
  Acc* p = vt + bs * hd;           // (group, block_size): scores, then weights
  Acc* m = p + group * bs;         // (group,)
  Acc* l = m + group;              // (group,)
  Acc* alpha = l + group;          // (group,)
  for (idx g = 0; g < group; ++g) {
    m[g] = sinks ? sinks[g] : -INFINITY;  // a sink: exp(sink - m) = 1 in the denominator from the start
    l[g] = sinks ? Acc(1) : Acc(0);
    for (idx d = 0; d < hd; ++d) {
      acc[g * hd + d] = Acc(0);
      qs[g * hd + d] = load(q, g * hd + d);
    }
  }
  for (int t0 = lo; t0 < n;) {
    const int t1 = (t0 / block_size + 1) * block_size;  // the end of t0's block
    const idx cnt = (n < t1 ? n : t1) - t0;
    const std::int64_t off = token_offset(table, t0, block_size, kv_heads, head_dim, kvh);
    const Acc* kb;
    const Acc* vb;
    idx stride;  // elements between consecutive keys of kb / vb
    if constexpr (in_place) {
      kb = reinterpret_cast<const Acc*>(k_cache) + off;
      vb = reinterpret_cast<const Acc*>(v_cache) + off;
      stride = row;
    } else {
      for (idx j = 0; j < cnt; ++j) {
        for (idx d = 0; d < hd; ++d) {
          kt[j * hd + d] = load(k_cache, off + j * row + d);
          vt[j * hd + d] = load(v_cache, off + j * row + d);
        }
      }
      kb = kt;
      vb = vt;
      stride = hd;
    }
    for (idx j = 0; j < cnt; ++j) {  // scores: each key row once for all heads of the group
      for (idx g = 0; g < group; ++g) p[g * bs + j] = dot_lanes(qs + g * hd, kb + j * stride, hd) * scale;
    }
    if (softcap > Acc(0)) {
      for (idx g = 0; g < group; ++g) {
        for (idx j = 0; j < cnt; ++j) p[g * bs + j] = soft_cap(p[g * bs + j], softcap);
      }
    }
    for (idx g = 0; g < group; ++g) {
      Acc* pg = p + g * bs;
      Acc mx = m[g];
      for (idx j = 0; j < cnt; ++j) mx = pg[j] > mx ? pg[j] : mx;
      alpha[g] = exp_acc(m[g] - mx);  // m = -inf before the first block: alpha = 0
      const Acc sum = exp_shift_sum(pg, cnt, mx);
      l[g] = l[g] * alpha[g] + sum;
      m[g] = mx;
      Acc* __restrict__ ag = acc + g * hd;
      for (idx d = 0; d < hd; ++d) ag[d] *= alpha[g];
    }
    for (idx j = 0; j < cnt; ++j) {  // acc_g += p_gj v_j: each value row once for all heads of the group
      const Acc* __restrict__ vj = vb + j * stride;
      for (idx g = 0; g < group; ++g) {
        Acc* __restrict__ ag = acc + g * hd;
        const Acc w = p[g * bs + j];
        for (idx d = 0; d < hd; ++d) ag[d] += w * vj[d];
      }
    }
    t0 += static_cast<int>(cnt);
  }
  for (idx g = 0; g < group; ++g) {
    const Acc inv = Acc(1) / l[g];
    for (idx d = 0; d < hd; ++d) store(out, g * hd + d, acc[g * hd + d] * inv);
  }
}
#endif  // !__CUDACC__

}  // namespace paged
}  // namespace rlhf_fast
