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
#include <stdexcept>
#include <vector>

#include "common.h"
#include "paged_attention_impl.h"  // paged::exp8: the branch-free expf, eight at a time
#include "registry.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace rlhf_fast {
namespace {

using idx = std::int64_t;
constexpr idx kChunk = 256;
constexpr std::int64_t kParallelMinElems = std::int64_t(1) << 20;  // below: one thread beats waking a team

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
template <typename Ops>
std::int64_t sample_row(const float* x, idx vocab, float u, double* sums, float* w) {
  const float mx = Ops::row_max(x, vocab);
  const idx chunks = (vocab + kChunk - 1) / kChunk;
  double total = 0.0;
  for (idx c = 0; c < chunks; ++c) {
    const idx n = vocab - c * kChunk < kChunk ? vocab - c * kChunk : kChunk;
    sums[c] = Ops::chunk_weights(x + c * kChunk, n, mx, w);
    total += sums[c];
  }
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
#pragma omp parallel if (parallel)
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

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(sampling) {
  namespace py = pybind11;
  m.def("sample_rows_cpu", &rlhf_fast::sample_rows_cpu, py::call_guard<py::gil_scoped_release>(),
        "inverse-CDF sampling of float32 logit rows at one uniform per row (pointers, rows, vocab, row stride)",
        py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("stride"), py::arg("uniforms"),
        py::arg("out"));
}
