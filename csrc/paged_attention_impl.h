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

// The whole computation for one (row, kv head) on one thread: `group` query heads (contiguous, head_dim each, at q)
// against keys 0..n-1; Load(ptr, i) -> Acc reads cache/query elements, Store(ptr, i, Acc) writes out.
// scratch: group * head_dim + 2 * group Acc values.
template <typename Acc, typename T, typename Load, typename Store>
RLHF_PA_HD void attend_group(const T* q, const T* k_cache, const T* v_cache, const std::int32_t* table, int n,
                             int block_size, int kv_heads, int head_dim, int kvh, int group, Acc scale, T* out,
                             Acc* scratch, Load load, Store store) {
  Acc* acc = scratch;
  Acc* m = scratch + group * head_dim;
  Acc* l = m + group;
  for (int g = 0; g < group; ++g) {
    m[g] = -INFINITY;
    l[g] = Acc(0);
    for (int d = 0; d < head_dim; ++d) acc[g * head_dim + d] = Acc(0);
  }
  for (int t = 0; t < n; ++t) {
    const std::int64_t off = token_offset(table, t, block_size, kv_heads, head_dim, kvh);
    for (int g = 0; g < group; ++g) {
      Acc s = Acc(0);
      for (int d = 0; d < head_dim; ++d) s += load(q, g * head_dim + d) * load(k_cache, off + d);
      Acc alpha, p;
      online_step(m[g], l[g], s * scale, alpha, p);
      for (int d = 0; d < head_dim; ++d) {
        acc[g * head_dim + d] = acc[g * head_dim + d] * alpha + p * load(v_cache, off + d);
      }
    }
  }
  for (int g = 0; g < group; ++g) {
    const Acc inv = Acc(1) / l[g];
    for (int d = 0; d < head_dim; ++d) store(out, g * head_dim + d, acc[g * head_dim + d] * inv);
  }
}

}  // namespace paged
}  // namespace rlhf_fast
