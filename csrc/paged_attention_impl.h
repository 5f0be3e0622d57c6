// Paged-attention decode, the algorithm shared by the CPU (csrc/paged_attention.cpp) and CUDA
// (csrc/cuda/paged_attention.cu) kernels: where a token's K/V live, and the online-softmax step.
//
// Cache layout: (num_blocks, block_size, kv_heads, head_dim); a row's token t is in slot t % block_size of block
// table[t / block_size]. For query head h (kv head h / group), with s_t = scale * <q, k_t>:
//   out = sum_t softmax(s)_t v_t, accumulated in one pass over t = 0..n-1 (online softmax):
//   m' = max(m, s_t);  l' = l * exp(m - m') + exp(s_t - m');  acc' = acc * exp(m - m') + exp(s_t - m') v_t.
// Keys are visited in one fixed order that depends only on n, so a row never depends on its batch.
#pragma once
#include <cmath>
#include <cstdint>

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

// Merge a second partial state (m2, l2, acc2) into (m, l, acc): used to combine per-warp partials on CUDA.
template <typename Acc>
RLHF_PA_HD void merge_scales(Acc m, Acc m2, Acc& a, Acc& b) {
  const Acc mm = m > m2 ? m : m2;
  a = exp_acc(m - mm);
  b = exp_acc(m2 - mm);
}

// <a, b> over n elements with kLanes independent partial sums (element d goes to lane d % kLanes), combined in a
// fixed order at the end: vectorisable, and the order depends only on n.
constexpr int kLanes = 8;
template <typename Acc>
RLHF_PA_HD Acc dot_lanes(const Acc* a, const Acc* b, int n) {
  Acc part[kLanes];
  for (int j = 0; j < kLanes; ++j) part[j] = Acc(0);
  int d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += a[d + j] * b[d + j];
  }
  for (int j = 0; d + j < n; ++j) part[j] += a[d + j] * b[d + j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// The whole computation for one (row, kv head) on one thread: `group` query heads (contiguous, head_dim each, at q)
// against keys 0..n-1; Load(ptr, i) -> Acc reads cache/query elements, Store(ptr, i, Acc) writes out.
// scratch: (group + 2) * head_dim + 2 * group Acc values.
template <typename Acc, typename T, typename Load, typename Store>
RLHF_PA_HD void attend_group(const T* q, const T* k_cache, const T* v_cache, const std::int32_t* table, int n,
                             int block_size, int kv_heads, int head_dim, int kvh, int group, Acc scale, T* out,
                             Acc* scratch, Load load, Store store) {
  Acc* acc = scratch;                     // (group, head_dim)
  Acc* qs = acc + group * head_dim;       // (group, head_dim) the queries, converted once
  Acc* kv = qs + group * head_dim;        // (2, head_dim) the current key and value
  Acc* m = kv + 2 * head_dim;             // (group,)
  Acc* l = m + group;                     // (group,)
  for (int g = 0; g < group; ++g) {
    m[g] = -INFINITY;
    l[g] = Acc(0);
    for (int d = 0; d < head_dim; ++d) {
      acc[g * head_dim + d] = Acc(0);
      qs[g * head_dim + d] = load(q, g * head_dim + d);
    }
  }
  Acc* kt = kv;
  Acc* vt = kv + head_dim;
  for (int t = 0; t < n; ++t) {
    const std::int64_t off = token_offset(table, t, block_size, kv_heads, head_dim, kvh);
    for (int d = 0; d < head_dim; ++d) {
      kt[d] = load(k_cache, off + d);
      vt[d] = load(v_cache, off + d);
    }
    for (int g = 0; g < group; ++g) {
      Acc alpha, p;
      online_step(m[g], l[g], dot_lanes(qs + g * head_dim, kt, head_dim) * scale, alpha, p);
      Acc* a = acc + g * head_dim;
      for (int d = 0; d < head_dim; ++d) a[d] = a[d] * alpha + p * vt[d];
    }
  }
  for (int g = 0; g < group; ++g) {
    const Acc inv = Acc(1) / l[g];
    for (int d = 0; d < head_dim; ++d) store(out, g * head_dim + d, acc[g * head_dim + d] * inv);
  }
}

}  // namespace paged
}  // namespace rlhf_fast
