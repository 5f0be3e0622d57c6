// Paged-attention decode on CPU: one online-softmax pass per (row, kv head), jobs in parallel (OpenMP). Registers
// `paged_attention_cpu` and, in a CUDA build, `paged_attention_cuda` (csrc/cuda/paged_attention.cu). The algorithm
// lives in paged_attention_impl.h.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "paged_attention_impl.h"
#include "registry.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#ifdef RLHF_FAST_WITH_CUDA
#include "cuda/paged_attention.h"
#endif

namespace rlhf_fast {
namespace {

struct Shape {
  std::int64_t rows;
  int heads, kv_heads, head_dim, block_size, max_blocks;
  int window;  // sliding window (0 = none)
};

void check_shape(const Shape& s) {
  if (s.rows < 0 || s.heads < 1 || s.kv_heads < 1 || s.head_dim < 1 || s.block_size < 1 || s.max_blocks < 1 ||
      s.window < 0) {
    throw std::invalid_argument("paged_attention: sizes must be positive (rows >= 0, sliding_window >= 0)");
  }
  if (s.heads % s.kv_heads != 0) {
    throw std::invalid_argument("paged_attention: heads (" + std::to_string(s.heads) + ") must be a multiple of "
                                "kv_heads (" + std::to_string(s.kv_heads) + ")");
  }
}

// Every context length in [1, max_blocks * block_size] and every block it reads in [0, num_blocks) (with a sliding
// window, the blocks before the window are not read: their entries may be stale, e.g. freed).
void check_tables(const Shape& s, const std::int32_t* tables, const std::int32_t* lens, std::int64_t num_blocks) {
  for (std::int64_t r = 0; r < s.rows; ++r) {
    const std::int64_t n = lens[r];
    if (n < 1 || n > static_cast<std::int64_t>(s.max_blocks) * s.block_size) {
      throw std::invalid_argument("paged_attention: context_lens[" + std::to_string(r) + "] = " + std::to_string(n) +
                                  " outside [1, max_blocks * block_size]");
    }
    const std::int64_t first = paged::first_key(static_cast<int>(n), s.window) / s.block_size;
    for (std::int64_t b = first; b < (n + s.block_size - 1) / s.block_size; ++b) {
      const std::int32_t id = tables[r * s.max_blocks + b];
      if (id < 0 || id >= num_blocks) {
        throw std::invalid_argument("paged_attention: block_tables[" + std::to_string(r) + ", " + std::to_string(b) +
                                    "] = " + std::to_string(id) + " outside [0, num_blocks)");
      }
    }
  }
}

// Below this many multiply-adds one thread beats waking a team on a loaded machine.
constexpr std::int64_t kParallelMinWork = std::int64_t(1) << 16;

#if defined(__x86_64__) && defined(__GNUC__)
#define RLHF_PA_AVX2 1
// float32 with head_dim % 32 == 0 on a CPU with AVX2 + FMA: `paged::attend_group`'s algorithm (same block-wise online
// softmax, same scratch layout) with 8-wide FMAs; the value accumulators of a 32-wide slice stay in registers over a
// block's keys. A row's result still depends only on that row. Query head g (of `group`, contiguous at q) reads kv
// head kvh + g / per_kv (per_kv: query heads per kv head): one kv head's group, or a whole row's heads.
__attribute__((target("avx2,fma"))) void attend_group_avx2(const float* q, const float* k_cache, const float* v_cache,
                                                          const std::int32_t* table, int n, int block_size,
                                                          int kv_heads, int head_dim, int kvh, int group, float scale,
                                                          int lo, float softcap, const float* sinks, float* out,
                                                          float* scratch, int per_kv, const float* next_k,
                                                          const float* next_v) {
  using paged::idx;
  const idx hd = head_dim, bs = block_size, row = static_cast<idx>(kv_heads) * head_dim;
  const idx row_lines = (row * static_cast<idx>(sizeof(float)) + 63) / 64;  // cache lines of one token's K (or V)
  float* acc = scratch;              // (group, head_dim)
  float* p = acc + 2 * group * hd + 2 * bs * hd;  // (group, block_size): scores, then weights
  float* m = p + group * bs;         // (group,)
  float* l = m + group;              // (group,)
  for (idx g = 0; g < group; ++g) {
    m[g] = sinks ? sinks[g] : -INFINITY;  // a sink: exp(sink - m) = 1 in the denominator from the start
    l[g] = sinks ? 1.0f : 0.0f;
    for (idx d = 0; d < hd; ++d) acc[g * hd + d] = 0.0f;
  }
  for (int t0 = lo; t0 < n;) {
    const int t1 = (t0 / block_size + 1) * block_size;  // the end of t0's block
    const idx cnt = (n < t1 ? n : t1) - t0;
    const float* kb = k_cache + paged::token_offset(table, t0, block_size, kv_heads, head_dim, kvh);
    const float* vb = v_cache + paged::token_offset(table, t0, block_size, kv_heads, head_dim, kvh);
    // Software prefetch of the block read next (this row's next one, else the next job's first): its token j's keys
    // and values (every kv head) are requested while token j of this block is scored. The blocks are scattered
    // 8 KiB pieces of a cache that is cold at every decode step, and the hardware prefetchers stop at page
    // boundaries. Spread over the tokens (not a burst per block or per row, which fills the miss queue and stalls
    // as much as it saves) this made the kernel ~13% faster inside the rollout engine (bench_rollout's model).
    const float* pk = next_k;
    const float* pv = next_v;
    if (t1 < n) {
      pk = k_cache + paged::token_offset(table, t1, block_size, kv_heads, head_dim, 0);
      pv = v_cache + paged::token_offset(table, t1, block_size, kv_heads, head_dim, 0);
    }
    for (idx j = 0; j < cnt; ++j) {
      if (pk != nullptr) {
        const char* ck = reinterpret_cast<const char*>(pk + j * row);
        const char* cv = reinterpret_cast<const char*>(pv + j * row);
        for (idx c = 0; c < row_lines; ++c) {
          _mm_prefetch(ck + 64 * c, _MM_HINT_T0);
          _mm_prefetch(cv + 64 * c, _MM_HINT_T0);
        }
      }
      for (idx g = 0; g < group; ++g) {
        const float* kj = kb + j * row + (g / per_kv) * hd;  // head g's kv head
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (idx d = 0; d < hd; d += 16) {
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + d), _mm256_loadu_ps(kj + d), a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + d + 8), _mm256_loadu_ps(kj + d + 8), a1);
        }
        const __m256 a = _mm256_add_ps(a0, a1);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_hadd_ps(h, h);
        h = _mm_hadd_ps(h, h);
        p[g * bs + j] = _mm_cvtss_f32(h) * scale;
      }
    }
    if (softcap > 0.0f) {
      for (idx g = 0; g < group; ++g) {
        for (idx j = 0; j < cnt; ++j) p[g * bs + j] = paged::soft_cap(p[g * bs + j], softcap);
      }
    }
    for (idx g = 0; g < group; ++g) {
      float* pg = p + g * bs;
      float mx = m[g];
      for (idx j = 0; j < cnt; ++j) mx = pg[j] > mx ? pg[j] : mx;
      const float alpha = paged::exp_acc(m[g] - mx);  // m = -inf before the first block: alpha = 0
      l[g] = l[g] * alpha + paged::exp_shift_sum(pg, cnt, mx);
      m[g] = mx;
      const __m256 al = _mm256_set1_ps(alpha);
      for (idx d = 0; d < hd; d += 32) {  // acc_g[d:d+32] = alpha acc_g + sum_j p_gj v_j, in registers
        float* ag = acc + g * hd + d;
        __m256 r0 = _mm256_mul_ps(_mm256_loadu_ps(ag), al), r1 = _mm256_mul_ps(_mm256_loadu_ps(ag + 8), al);
        __m256 r2 = _mm256_mul_ps(_mm256_loadu_ps(ag + 16), al), r3 = _mm256_mul_ps(_mm256_loadu_ps(ag + 24), al);
        for (idx j = 0; j < cnt; ++j) {
          const __m256 w = _mm256_set1_ps(pg[j]);
          const float* vj = vb + j * row + (g / per_kv) * hd + d;
          r0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj), r0);
          r1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8), r1);
          r2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 16), r2);
          r3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 24), r3);
        }
        _mm256_storeu_ps(ag, r0);
        _mm256_storeu_ps(ag + 8, r1);
        _mm256_storeu_ps(ag + 16, r2);
        _mm256_storeu_ps(ag + 24, r3);
      }
    }
    t0 += static_cast<int>(cnt);
  }
  for (idx g = 0; g < group; ++g) {
    const float inv = 1.0f / l[g];
    for (idx d = 0; d < hd; ++d) out[g * hd + d] = acc[g * hd + d] * inv;
  }
}

bool use_avx2(int dtype, int head_dim) {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && dtype == kFloat32 && head_dim % 32 == 0;
}
#else
bool use_avx2(int, int) { return false; }
#endif

template <typename Acc, typename T, typename Load, typename Store>
void run(const Shape& s, std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
         const std::int32_t* tables, const std::int32_t* lens, double scale, double softcap, const double* sinks,
         Load load, Store store, bool avx2 = false) {
  (void)avx2;
  const int group = s.heads / s.kv_heads;
  // With a few rows or more the AVX2 kernel takes a whole row per job (all its kv heads), reading each cached
  // token's keys and values (kv_heads x head_dim, contiguous) in one sweep of its blocks (measured 7-10% faster on
  // a cold cache than a kv head's strided share); otherwise one (row, kv head) a job. Same arithmetic either way.
  const int per_job = avx2 && s.rows >= 4 ? s.kv_heads : 1;
  const std::int64_t jobs = s.rows * s.kv_heads / per_job;
  std::int64_t work = 0;
  for (std::int64_t r = 0; r < s.rows; ++r) {
    work += static_cast<std::int64_t>(lens[r] - paged::first_key(lens[r], s.window)) * s.heads * s.head_dim;
  }
  std::vector<Acc> sink(sinks ? s.heads : 0);  // in the accumulator's type
  for (std::size_t h = 0; h < sink.size(); ++h) sink[h] = static_cast<Acc>(sinks[h]);
  const bool parallel = jobs > 1 && work >= kParallelMinWork;
  (void)parallel;
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp parallel if (parallel) num_threads(max_threads())
#endif
  {
    std::vector<Acc> scratch(
        static_cast<std::size_t>(paged::attend_scratch_size(group * per_job, s.head_dim, s.block_size)));
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (std::int64_t j = 0; j < jobs; ++j) {
      const std::int64_t r = j * per_job / s.kv_heads;
      const int kvh = static_cast<int>(j * per_job % s.kv_heads);
      const std::int64_t qoff = (r * s.heads + static_cast<std::int64_t>(kvh) * group) * s.head_dim;
      const int lo = paged::first_key(lens[r], s.window);
      const Acc* sg = sinks ? sink.data() + static_cast<std::int64_t>(kvh) * group : nullptr;
#ifdef RLHF_PA_AVX2
      if constexpr (std::is_same<T, float>::value) {
        if (avx2) {
          const float* nk = nullptr;  // where the next job starts reading (prefetched during this one's last block)
          const float* nv = nullptr;
          if (j + 1 < jobs) {
            const std::int64_t r1 = (j + 1) * per_job / s.kv_heads;
            const int t = paged::first_key(lens[r1], s.window);
            const std::int64_t off = paged::token_offset(tables + r1 * s.max_blocks, t - t % s.block_size,
                                                         s.block_size, s.kv_heads, s.head_dim, 0);
            nk = ptr<const float>(k) + off;
            nv = ptr<const float>(v) + off;
          }
          attend_group_avx2(ptr<const float>(q) + qoff, ptr<const float>(k), ptr<const float>(v),
                            tables + r * s.max_blocks, lens[r], s.block_size, s.kv_heads, s.head_dim, kvh,
                            group * per_job, static_cast<float>(scale), lo, static_cast<float>(softcap),
                            sg, ptr<float>(out) + qoff, scratch.data(), group, nk, nv);
          continue;
        }
      }
#endif
      paged::attend_group<Acc>(ptr<const T>(q) + qoff, ptr<const T>(k), ptr<const T>(v),
                               tables + r * s.max_blocks, lens[r], s.block_size, s.kv_heads, s.head_dim, kvh, group,
                               static_cast<Acc>(scale), lo, static_cast<Acc>(softcap), sg, ptr<T>(out) + qoff,
                               scratch.data(), load, store);
    }
  }
}

// out, q: (rows, heads, head_dim); k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim), all of one dtype;
// block_tables: (rows, max_blocks) int32; context_lens: (rows,) int32. Accumulates in fp32 (fp64 for fp64).
// window: sliding window (0 = none); softcap: score soft-capping (0 = none); sinks: (heads,) float64 or 0 (none).
void paged_attention_cpu(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                         std::uintptr_t block_tables, std::uintptr_t context_lens, std::int64_t rows, int heads,
                         int kv_heads, int head_dim, int block_size, int max_blocks, std::int64_t num_blocks,
                         double scale, int dtype, int window, double softcap, std::uintptr_t sinks) {
  const Shape s{rows, heads, kv_heads, head_dim, block_size, max_blocks, window};
  const auto* sk = sinks ? ptr<const double>(sinks) : nullptr;
  check_shape(s);
  const auto* tables = ptr<const std::int32_t>(block_tables);
  const auto* lens = ptr<const std::int32_t>(context_lens);
  check_tables(s, tables, lens, num_blocks);
  switch (dtype) {
    case kFloat32:
      run<float, float>(s, out, q, k_cache, v_cache, tables, lens, scale, softcap, sk,
                        [](const float* p, std::int64_t i) { return p[i]; },
                        [](float* p, std::int64_t i, float x) { p[i] = x; }, use_avx2(dtype, head_dim));
      return;
    case kFloat64:
      run<double, double>(s, out, q, k_cache, v_cache, tables, lens, scale, softcap, sk,
                          [](const double* p, std::int64_t i) { return p[i]; },
                          [](double* p, std::int64_t i, double x) { p[i] = x; });
      return;
    case kBFloat16:
      run<float, std::uint16_t>(s, out, q, k_cache, v_cache, tables, lens, scale, softcap, sk,
                                [](const std::uint16_t* p, std::int64_t i) { return bf16_to_float(p[i]); },
                                [](std::uint16_t* p, std::int64_t i, float x) { p[i] = float_to_bf16(x); });
      return;
    case kFloat16:
      run<float, std::uint16_t>(s, out, q, k_cache, v_cache, tables, lens, scale, softcap, sk,
                                [](const std::uint16_t* p, std::int64_t i) { return fp16_to_float(p[i]); },
                                [](std::uint16_t* p, std::int64_t i, float x) { p[i] = float_to_fp16(x); });
      return;
  }
  throw std::invalid_argument("paged_attention_cpu: unsupported dtype code " + std::to_string(dtype));
}

// k, v: (tokens, row_bytes) contiguous rows in the caches' dtype; k_cache, v_cache: (num_slots, row_bytes); slots:
// (tokens,) int64, token i's row goes to slot slots[i] (negative: skipped).
void store_kv_cache_cpu(std::uintptr_t k, std::uintptr_t v, std::uintptr_t k_cache, std::uintptr_t v_cache,
                        std::uintptr_t slots, std::int64_t tokens, std::int64_t row_bytes, std::int64_t num_slots) {
  const auto* slot = ptr<const std::int64_t>(slots);
  for (std::int64_t i = 0; i < tokens; ++i) {
    if (slot[i] >= num_slots) {
      throw std::invalid_argument("store_kv_cache: slot_mapping[" + std::to_string(i) + "] = " +
                                  std::to_string(slot[i]) + " outside the cache's " + std::to_string(num_slots) +
                                  " slots");
    }
  }
  for (std::int64_t i = 0; i < tokens; ++i) {
    if (slot[i] < 0) continue;
    std::memcpy(ptr<char>(k_cache) + slot[i] * row_bytes, ptr<const char>(k) + i * row_bytes, row_bytes);
    std::memcpy(ptr<char>(v_cache) + slot[i] * row_bytes, ptr<const char>(v) + i * row_bytes, row_bytes);
  }
}

#ifdef RLHF_FAST_WITH_CUDA
void paged_attention_cuda_checked(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache,
                                  std::uintptr_t v_cache, std::uintptr_t block_tables, std::uintptr_t context_lens,
                                  std::int64_t rows, int heads, int kv_heads, int head_dim, int block_size,
                                  int max_blocks, std::int64_t num_blocks, double scale, int dtype, int window,
                                  double softcap, std::uintptr_t sinks, std::uintptr_t stream) {
  check_shape(Shape{rows, heads, kv_heads, head_dim, block_size, max_blocks, window});
  (void)num_blocks;  // tables live on the device: checked there only by the caller's contract
  paged_attention_cuda(out, q, k_cache, v_cache, block_tables, context_lens, rows, heads, kv_heads, head_dim,
                       block_size, max_blocks, static_cast<float>(scale), dtype, window, static_cast<float>(softcap),
                       sinks, stream);
}
#endif

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(paged_attention) {
  namespace py = pybind11;
  m.def("paged_attention_cpu", &rlhf_fast::paged_attention_cpu, py::call_guard<py::gil_scoped_release>(),
        "paged-attention decode on CPU (pointers, rows, heads, kv_heads, head_dim, block_size, max_blocks, "
        "num_blocks, scale, dtype code, sliding window, softcap, sinks pointer (float64, 0 = none))",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"),
        py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("sinks") = 0);
  m.def("store_kv_cache_cpu", &rlhf_fast::store_kv_cache_cpu, py::call_guard<py::gil_scoped_release>(),
        "copy K/V rows into the paged caches at slot_mapping (pointers, tokens, row bytes, cache slots)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("tokens"),
        py::arg("row_bytes"), py::arg("num_slots"));
#ifdef RLHF_FAST_WITH_CUDA
  m.def("paged_attention_cuda", &rlhf_fast::paged_attention_cuda_checked, py::call_guard<py::gil_scoped_release>(),
        "paged-attention decode on CUDA (one thread block per (row, kv head), warps split the keys)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"),
        py::arg("window"), py::arg("softcap"), py::arg("sinks"), py::arg("stream"));
#endif
}
