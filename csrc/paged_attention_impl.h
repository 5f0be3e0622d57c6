// Paged-attention decode, the algorithm shared by the CPU (csrc/paged_attention.cpp) and CUDA
// (csrc/cuda/paged_attention.cu) kernels: where a token's K/V live, and the online-softmax step.
//
// Cache layout: (num_blocks, block_size, kv_heads, head_dim); a row's token t is in slot t % block_size of block
// table[t / block_size]. For query head h (kv head h / group), with s_t = scale * <q, k_t>:
//   out = sum_t softmax(s)_t v_t, accumulated in one pass over t = 0..n-1 (online softmax):
//   m' = max(m, s_t);  l' = l * exp(m - m') + exp(s_t - m');  acc' = acc * exp(m - m') + exp(s_t - m') v_t
// (per key on CUDA; per cache block of keys on CPU, with m' the max over the block).
// Keys are visited in one fixed order that depends only on n (and block_size), so a row never depends on its batch.
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

// Indices are 64-bit: Python builds extensions with -fwrapv, under which int index arithmetic blocks vectorisation.
using idx = std::int64_t;

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

// a = a * alpha + sum_j w[j] * v[j, :], j in order (v: (cnt, head_dim)).
template <typename Acc>
RLHF_PA_HD void axpy_block(Acc* __restrict__ a, Acc alpha, const Acc* __restrict__ w, const Acc* __restrict__ v,
                           idx cnt, idx head_dim) {
  for (idx d = 0; d < head_dim; ++d) a[d] *= alpha;
  for (idx j = 0; j < cnt; ++j) {
    const Acc wj = w[j];
    const Acc* __restrict__ vj = v + j * head_dim;
    for (idx d = 0; d < head_dim; ++d) a[d] += wj * vj[d];
  }
}

// The whole computation for one (row, kv head) on one thread, a cache block of keys at a time (one rescale of the
// accumulator per block): `group` query heads (contiguous, head_dim each, at q) against keys 0..n-1.
// Load(ptr, i) -> Acc reads cache/query elements, Store(ptr, i, Acc) writes out.
// scratch: attend_scratch_size(group, head_dim, block_size) Acc values.
RLHF_PA_HD std::int64_t attend_scratch_size(int group, int head_dim, int block_size) {
  return static_cast<std::int64_t>(2 * group + 2 * block_size) * head_dim + block_size + 2 * group;
}

template <typename Acc, typename T, typename Load, typename Store>
RLHF_PA_HD void attend_group(const T* q, const T* k_cache, const T* v_cache, const std::int32_t* table, int n,
                             int block_size, int kv_heads, int head_dim, int kvh, int group, Acc scale, T* out,
                             Acc* scratch, Load load, Store store) {
  Acc* acc = scratch;                          // (group, head_dim)
  Acc* qs = acc + group * head_dim;            // (group, head_dim): the queries, converted once
  Acc* kt = qs + group * head_dim;             // (block_size, head_dim): this block's keys
  Acc* vt = kt + block_size * head_dim;        // (block_size, head_dim): and values
  Acc* s = vt + block_size * head_dim;         // (block_size,): scores, then weights
  Acc* m = s + block_size;                     // (group,)
  Acc* l = m + group;                          // (group,)
  for (idx g = 0; g < group; ++g) {
    m[g] = -INFINITY;
    l[g] = Acc(0);
    for (idx d = 0; d < head_dim; ++d) {
      acc[g * head_dim + d] = Acc(0);
      qs[g * head_dim + d] = load(q, g * head_dim + d);
    }
  }
  for (int t0 = 0; t0 < n; t0 += block_size) {
    const idx cnt = n - t0 < block_size ? n - t0 : block_size;
    const std::int64_t off = token_offset(table, t0, block_size, kv_heads, head_dim, kvh);
    for (idx j = 0; j < cnt; ++j) {  // tokens of one block are kv_heads * head_dim apart
      const idx o = off + j * kv_heads * head_dim;
      for (idx d = 0; d < head_dim; ++d) {
        kt[j * head_dim + d] = load(k_cache, o + d);
        vt[j * head_dim + d] = load(v_cache, o + d);
      }
    }
    for (idx g = 0; g < group; ++g) {
      Acc mx = m[g];
      for (idx j = 0; j < cnt; ++j) {
        s[j] = dot_lanes(qs + g * head_dim, kt + j * head_dim, head_dim) * scale;
        mx = s[j] > mx ? s[j] : mx;
      }
      const Acc alpha = exp_acc(m[g] - mx);  // m = -inf before the first block: alpha = 0
      Acc sum = Acc(0);
      for (idx j = 0; j < cnt; ++j) {
        s[j] = exp_acc(s[j] - mx);
        sum += s[j];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = mx;
      axpy_block(acc + g * head_dim, alpha, s, vt, cnt, head_dim);
    }
  }
  for (idx g = 0; g < group; ++g) {
    const Acc inv = Acc(1) / l[g];
    for (idx d = 0; d < head_dim; ++d) store(out, g * head_dim + d, acc[g * head_dim + d] * inv);
  }
}

}  // namespace paged
}  // namespace rlhf_fast
