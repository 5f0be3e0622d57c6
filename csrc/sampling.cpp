// Inverse-CDF sampling on CPU, one row of float32 logits at a time, all passes in cache: registers `sample_rows_cpu`.
//
// Row b's token is the first i with cdf(i) > u_b * cdf(V - 1), where cdf is the running sum of the unnormalised
// weights w_i = exp(x_i - max_j x_j) (-inf logits, the tokens top-k/top-p dropped, weigh exactly 0 and can never be
// drawn). The sum runs in a fixed order that depends only on V: chunks of kChunk tokens, each summed in kLanes float
// lanes, the chunk sums added in order in double; inside the chosen chunk the weights are added one by one. So a
// row's token depends only on its logits and its uniform u_b in [0, 1), never on the batch.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "paged_attention_impl.h"  // paged::exp8: the branch-free expf, eight at a time
#include "registry.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace rlhf_fast {

// csrc/logprobs.cpp: token_logprobs' forward row kernel, the log-prob of `label` (bitwise the op's)
float token_logprob_row_f32(const float* x, std::int64_t v, double inv_temp, float thr, std::int64_t label);

namespace {

using idx = std::int64_t;
constexpr idx kChunk = 256;
constexpr std::int64_t kParallelMinElems = std::int64_t(1) << 16;  // below: one thread beats waking a team

using paged::vf8;

// Passes over a row in baseline SIMD (paged::vf8, SSE on x86-64).
struct BaseOps {
  static float row_max(const float* x, idx n) {
    vf8 m = vf8{} - INFINITY;
    idx i = 0;
    for (; i + 8 <= n; i += 8) m = paged::max8(paged::load8(x + i), m);
    if (i < n) m = paged::max8(paged::load8_tail(x + i, n - i, -INFINITY), m);
    float r = m[0];
    for (int j = 1; j < 8; ++j) r = m[j] > r ? m[j] : r;
    return r;
  }

  // w[0..n) = exp(x[0..n) - mx) for n <= kChunk; returns their sum in 8 lanes combined in a fixed order.
  static float chunk_weights(const float* x, idx n, float mx, float* w) {
    vf8 acc = vf8{};
    for (idx i = 0; i < n; i += 8) {
      const vf8 v = paged::exp8((n - i >= 8 ? paged::load8(x + i) : paged::load8_tail(x + i, n - i, -INFINITY)) - mx);
      std::memcpy(w + i, &v, sizeof v);
      acc += v;
    }
    return paged::sum8(acc);
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define RLHF_SAMPLING_AVX2 1
// The same passes with AVX2 + FMA (paged::exp8's algorithm on one 8-wide register), for CPUs that have them.
struct Avx2Ops {
  __attribute__((target("avx2,fma"))) static __m256 exp(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LE_OQ), _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }

  __attribute__((target("avx2,fma"))) static float row_max(const float* x, idx n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    idx i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
    float part[8];
    _mm256_storeu_ps(part, m);
    float r = part[0];
    for (int j = 1; j < 8; ++j) r = part[j] > r ? part[j] : r;
    for (; i < n; ++i) r = x[i] > r ? x[i] : r;
    return r;
  }

  __attribute__((target("avx2,fma"))) static float chunk_weights(const float* x, idx n, float mx, float* w) {
    const __m256 shift = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (idx i = 0; i < n; i += 8) {
      float tail[8];
      const float* src = x + i;
      if (n - i < 8) {
        for (idx j = 0; j < 8; ++j) tail[j] = j < n - i ? x[i + j] : -INFINITY;
        src = tail;
      }
      const __m256 v = exp(_mm256_sub_ps(_mm256_loadu_ps(src), shift));
      _mm256_storeu_ps(w + i, v);
      acc = _mm256_add_ps(acc, v);
    }
    float part[8];
    _mm256_storeu_ps(part, acc);
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
};

bool use_avx2() {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu;
}
#endif

// The token of one row: x (vocab,), u in [0, 1); sums: ceil(vocab / kChunk) doubles, w: kChunk floats of scratch.
// row_total: the row's max mx and total = sum of the chunk sums of exp(x - mx), in a fixed order (also the
// log-softmax's normaliser: `row_logprob`).
template <typename Ops>
double row_total(const float* x, idx vocab, float mx, double* sums, float* w) {
  const idx chunks = (vocab + kChunk - 1) / kChunk;
  double total = 0.0;
  for (idx c = 0; c < chunks; ++c) {
    const idx n = vocab - c * kChunk < kChunk ? vocab - c * kChunk : kChunk;
    sums[c] = Ops::chunk_weights(x + c * kChunk, n, mx, w);
    total += sums[c];
  }
  return total;
}

// mx_out / total_out (may be null): the row's max and `row_total`, which give the drawn token's log-prob.
template <typename Ops>
std::int64_t sample_row(const float* x, idx vocab, float u, double* sums, float* w, float* mx_out = nullptr,
                        double* total_out = nullptr) {
  const float mx = Ops::row_max(x, vocab);
  const idx chunks = (vocab + kChunk - 1) / kChunk;
  const double total = row_total<Ops>(x, vocab, mx, sums, w);
  if (mx_out) *mx_out = mx;
  if (total_out) *total_out = total;
  double thr = static_cast<double>(u) * total;
  double acc = 0.0;
  idx c = 0;
  for (; c < chunks && !(acc + sums[c] > thr); ++c) acc += sums[c];  // a chunk of weight 0 is never chosen
  if (c == chunks) {  // u * total rounded up to total: the last chunk with any weight
    for (c = chunks - 1; c > 0 && !(sums[c] > 0.0); --c) {}
    thr = INFINITY;  // nothing crosses it: falls through to the chunk's last token of weight > 0
  }
  const idx lo = c * kChunk, n = vocab - lo < kChunk ? vocab - lo : kChunk;
  Ops::chunk_weights(x + lo, n, mx, w);  // the same weights again, now kept
  idx last = 0;
  for (idx i = 0; i < n; ++i) {
    if (w[i] > 0.0f) {
      last = i;
      acc += w[i];
      if (acc > thr) return lo + i;
    }
  }
  return lo + last;  // the lanes' and the one-by-one sums of the chunk differ in rounding: its last kept token
}

// logits: (rows, vocab) float32, row stride `stride`; uniforms: (rows,) float32 in [0, 1); out: (rows,) int64.
void sample_rows_cpu(std::uintptr_t logits, std::int64_t rows, std::int64_t vocab, std::int64_t stride,
                     std::uintptr_t uniforms, std::uintptr_t out) {
  if (rows < 0 || vocab < 1 || stride < vocab) {
    throw std::invalid_argument("sample_rows_cpu: need rows >= 0, vocab >= 1 and stride >= vocab");
  }
  const auto* x = ptr<const float>(logits);
  const auto* u = ptr<const float>(uniforms);
  auto* tok = ptr<std::int64_t>(out);
  const idx chunks = (vocab + kChunk - 1) / kChunk;
  const bool parallel = rows > 1 && rows * vocab >= kParallelMinElems;
  (void)parallel;
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp parallel if (parallel) num_threads(max_threads())
#endif
  {
    std::vector<double> sums(static_cast<std::size_t>(chunks));
    std::vector<float> w(kChunk + 8);
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (std::int64_t r = 0; r < rows; ++r) {
#ifdef RLHF_SAMPLING_AVX2
      if (use_avx2()) {
        tok[r] = sample_row<Avx2Ops>(x + r * stride, vocab, u[r], sums.data(), w.data());
        continue;
      }
#endif
      tok[r] = sample_row<BaseOps>(x + r * stride, vocab, u[r], sums.data(), w.data());
    }
  }
}

// Philox4x32-10 (rollout/philox.py, Random123's philox4x32_R(10, ctr, key)): the first output word of counter
// (position, stream mod 2^32, stream >> 32, 0) under key (k0, k1), as a float32 uniform in [0, 1): its top 24 bits
// times 2^-24. Bit for bit `philox.uniform`.
float philox_uniform(std::uint32_t k0, std::uint32_t k1, std::int64_t stream, std::int64_t position) {
  std::uint32_t c0 = static_cast<std::uint32_t>(position), c1 = static_cast<std::uint32_t>(stream);
  std::uint32_t c2 = static_cast<std::uint32_t>(static_cast<std::uint64_t>(stream) >> 32), c3 = 0;
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(0xD2511F53u) * c0;
    const std::uint64_t p1 = static_cast<std::uint64_t>(0xCD9E8D57u) * c2;
    const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<std::uint32_t>(p1);
    c3 = static_cast<std::uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
  return static_cast<float>(c0 >> 8) * (1.0f / 16777216.0f);
}

// Greedy: the first index of the row's maximum (a NaN counts as the maximum, as torch.argmax).
std::int64_t row_argmax(const float* x, idx vocab) {
  idx best = 0;
  float m = x[0];
  if (std::isnan(m)) return 0;
  for (idx i = 1; i < vocab; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > m) {
      m = x[i];
      best = i;
    }
  }
  return best;
}

// log softmax(z)[tok] from the sampler's own pass: the row's max mx and `row_total` (no second pass over the row).
inline float row_logprob(const float* z, std::int64_t tok, float mx, double total) {
  return static_cast<float>(static_cast<double>(z[tok] - mx) - std::log(total));
}

// Greedy: the row's max and whether it holds a NaN, in one pass.
template <typename Ops>
float row_max_nan(const float* x, idx vocab, bool* nan) {
  const float mx = Ops::row_max(x, vocab);
  bool any = mx != mx;
  for (idx i = 0; i < vocab; ++i) any |= x[i] != x[i];
  *nan = any;
  return mx;
}

float token_logprob_row(const float* x, idx vocab, double inv_temp, float thr, std::int64_t label) {
  return ::rlhf_fast::token_logprob_row_f32(x, vocab, inv_temp, thr, label);
}

// The decode step's whole sampler for float32 logit rows (rollout/sampling.py `sample` on CPU), one pass over the
// rows in cache: z = x * inv_temp cut below thr[b] (thr 0: no cut), each row's uniform from Philox at
// (positions[b], streams[b]) under key (key[0], key[1]), the token by `sample_row` (greedy: `row_argmax`, no draw),
// and its log-prob: exact = 1 through token_logprobs' own row kernel (bitwise the trainer's op; at lp_inv_temp,
// support lp_thr (0: all)), exact = 0 from the sampling pass (same support and temperature; float rounding apart).
void sample_fused_cpu(std::uintptr_t logits, std::int64_t rows, std::int64_t vocab, std::int64_t stride,
                      double inv_temp, int greedy, std::uintptr_t thr, std::uintptr_t key, std::uintptr_t streams,
                      std::uintptr_t positions, int exact, double lp_inv_temp, std::uintptr_t lp_thr,
                      std::uintptr_t out_tokens, std::uintptr_t out_logprobs) {
  if (rows < 0 || vocab < 1 || stride < vocab) {
    throw std::invalid_argument("sample_fused_cpu: need rows >= 0, vocab >= 1 and stride >= vocab");
  }
  if (!exact && (greedy ? (lp_inv_temp != 1.0 || lp_thr) : (lp_inv_temp != inv_temp || lp_thr != thr))) {
    throw std::invalid_argument("sample_fused_cpu: exact = 0 takes the log-probs at the sampling temperature and "
                                "support (greedy: temperature 1, the whole row)");
  }
  const auto* x = ptr<const float>(logits);
  const auto* th = thr ? ptr<const float>(thr) : nullptr;
  const auto* lth = lp_thr ? ptr<const float>(lp_thr) : nullptr;
  const auto* k = ptr<const std::int64_t>(key);
  const auto k0 = static_cast<std::uint32_t>(k[0]), k1 = static_cast<std::uint32_t>(k[1]);
  const auto* st = ptr<const std::int64_t>(streams);
  const auto* po = ptr<const std::int64_t>(positions);
  auto* tok = ptr<std::int64_t>(out_tokens);
  auto* lp = ptr<float>(out_logprobs);
  const idx chunks = (vocab + kChunk - 1) / kChunk;
  const bool scale = inv_temp != 1.0;
  const float inv_t = static_cast<float>(inv_temp);
  const bool parallel = rows > 1 && rows * vocab >= kParallelMinElems;
  (void)parallel;
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp parallel if (parallel) num_threads(max_threads())
#endif
  {
    std::vector<double> sums(static_cast<std::size_t>(chunks));
    std::vector<float> w(kChunk + 8);
    std::vector<float> z(greedy || (!scale && !th) ? 0 : static_cast<std::size_t>(vocab));
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * stride;
      const float* zr = xr;  // the scaled, cut row the token is drawn from
      if (!z.empty()) {
        const float t = th ? th[r] : -INFINITY;
        for (idx i = 0; i < vocab; ++i) {  // as `inverse_cdf`: x * (1 / T) in float32, -inf below the threshold
          const float v = scale ? xr[i] * inv_t : xr[i];
          z[i] = v < t ? -INFINITY : v;
        }
        zr = z.data();
      }
      std::int64_t t;
      float mx;
      double total = 0.0;
      if (greedy) {  // the first index of the (vectorised) row max; a row with a NaN: torch.argmax's answer, the NaN
        bool nan;
#ifdef RLHF_SAMPLING_AVX2
        if (use_avx2()) {
          mx = row_max_nan<Avx2Ops>(xr, vocab, &nan);
        } else
#endif
          mx = row_max_nan<BaseOps>(xr, vocab, &nan);
        t = 0;
        while (t < vocab && !(xr[t] == mx)) ++t;
        if (nan || t == vocab) t = row_argmax(xr, vocab);
        if (!exact) {
#ifdef RLHF_SAMPLING_AVX2
          if (use_avx2()) {
            total = row_total<Avx2Ops>(xr, vocab, mx, sums.data(), w.data());
          } else
#endif
            total = row_total<BaseOps>(xr, vocab, mx, sums.data(), w.data());
        }
      } else {
        const float u = philox_uniform(k0, k1, st[r], po[r]);
#ifdef RLHF_SAMPLING_AVX2
        if (use_avx2()) {
          t = sample_row<Avx2Ops>(zr, vocab, u, sums.data(), w.data(), &mx, &total);
        } else
#endif
          t = sample_row<BaseOps>(zr, vocab, u, sums.data(), w.data(), &mx, &total);
      }
      const float l = exact ? token_logprob_row(xr, vocab, lp_inv_temp, lth ? lth[r] : -INFINITY, t)
                            : row_logprob(zr, t, mx, total);
      tok[r] = t;
      lp[r] = l;
    }
  }
}

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(sampling) {
  namespace py = pybind11;
  m.def("sample_rows_cpu", &rlhf_fast::sample_rows_cpu, py::call_guard<py::gil_scoped_release>(),
        "inverse-CDF sampling of float32 logit rows at one uniform per row (pointers, rows, vocab, row stride)",
        py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("stride"), py::arg("uniforms"),
        py::arg("out"));
  m.def("sample_fused_cpu", &rlhf_fast::sample_fused_cpu, py::call_guard<py::gil_scoped_release>(),
        "the decode step's sampler on float32 logit rows: Philox uniforms, temperature, threshold cut, inverse CDF "
        "(or argmax) and the drawn token's log-prob, one pass per row",
        py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("stride"), py::arg("inv_temp"), py::arg("greedy"),
        py::arg("thr"), py::arg("key"), py::arg("streams"), py::arg("positions"), py::arg("exact"),
        py::arg("lp_inv_temp"), py::arg("lp_thr"), py::arg("out_tokens"), py::arg("out_logprobs"));
}
