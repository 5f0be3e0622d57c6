// Paged-attention decode on CUDA. Grid (rows, kv_heads, head chunks); each block's warps split a row's keys
// (warp w takes keys w, w + W, ...), lanes split head_dim, and every key loaded is used by all query heads of the
// kv head's group (up to kHeadsPerBlock at a time). Each warp keeps an online-softmax state per head
// (paged_attention_impl.h); the warps' partial states are merged through shared memory at the end, where a head's
// sink (if any) joins the denominator once. With a sliding window the warps split keys first_key(n, W)..n-1 only;
// soft-capping applies to each score. The key order of every reduction depends only on the row's context length
// (and the window): batch-invariant.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../paged_attention_impl.h"
#include "cuda_utils.cuh"
#include "paged_attention.h"

namespace rlhf_fast {
namespace {

constexpr int kWarps = 4;
constexpr int kHeadsPerBlock = 8;

template <typename T>
T* dptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// DPL: head_dim elements per lane (lane l holds d = l + 32 * i).
template <typename T, int DPL>
__global__ void paged_attention_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                                       const T* __restrict__ v_cache, const std::int32_t* __restrict__ block_tables,
                                       const std::int32_t* __restrict__ context_lens, int heads, int kv_heads,
                                       int head_dim, int block_size, int max_blocks, float scale, int window,
                                       float softcap, const float* __restrict__ sinks) {
  extern __shared__ float smem[];  // (kWarps, kHeadsPerBlock, head_dim + 2): acc, m, l of every warp
  const int row = blockIdx.x, kvh = blockIdx.y;
  const int group = heads / kv_heads;
  const int g0 = blockIdx.z * kHeadsPerBlock;
  const int gc = min(kHeadsPerBlock, group - g0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = context_lens[row];
  const std::int32_t* table = block_tables + static_cast<std::int64_t>(row) * max_blocks;

  float qv[kHeadsPerBlock][DPL], acc[kHeadsPerBlock][DPL], m[kHeadsPerBlock], l[kHeadsPerBlock];
#pragma unroll
  for (int g = 0; g < kHeadsPerBlock; ++g) {
    const std::int64_t qoff = (static_cast<std::int64_t>(row) * heads + kvh * group + g0 + g) * head_dim;
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      qv[g][i] = (g < gc && d < head_dim) ? to_f(q[qoff + d]) : 0.f;
      acc[g][i] = 0.f;
    }
  }
  for (int t = paged::first_key(n, window) + warp; t < n; t += kWarps) {
    const std::int64_t off = paged::token_offset(table, t, block_size, kv_heads, head_dim, kvh);
    float kk[DPL], vv[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      kk[i] = d < head_dim ? to_f(k_cache[off + d]) : 0.f;
      vv[i] = d < head_dim ? to_f(v_cache[off + d]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kHeadsPerBlock; ++g) {
      if (g >= gc) break;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) s += qv[g][i] * kk[i];
      s = warp_sum(s) * scale;
      if (softcap > 0.f) s = softcap * tanhf(s / softcap);
      float alpha, p;
      paged::online_step(m[g], l[g], s, alpha, p);
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] = acc[g][i] * alpha + p * vv[i];
    }
  }
  const int stride = head_dim + 2;
  const int row_head0 = kvh * group + g0;  // the head of g = 0 (sinks are per head)
  for (int g = 0; g < gc; ++g) {
    float* slot = smem + (warp * kHeadsPerBlock + g) * stride;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) slot[d] = acc[g][i];
    }
    if (lane == 0) {
      slot[head_dim] = m[g];
      slot[head_dim + 1] = l[g];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < gc * head_dim; idx += blockDim.x) {
    const int g = idx / head_dim, d = idx % head_dim;
    const float sink = sinks ? sinks[row_head0 + g] : -INFINITY;
    float mm = sink;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, smem[(w * kHeadsPerBlock + g) * stride + head_dim]);
    float num = 0.f, den = sinks ? paged::exp_acc(sink - mm) : 0.f;
    for (int w = 0; w < kWarps; ++w) {  // warps that saw no key have m = -inf, l = 0: weight 0
      const float* slot = smem + (w * kHeadsPerBlock + g) * stride;
      if (slot[head_dim + 1] == 0.f) continue;
      const float a = paged::exp_acc(slot[head_dim] - mm);
      num += slot[d] * a;
      den += slot[head_dim + 1] * a;
    }
    const std::int64_t ooff = (static_cast<std::int64_t>(row) * heads + kvh * group + g0 + g) * head_dim;
    out[ooff + d] = from_f<T>(num / den);
  }
}

template <typename T>
void launch(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t tables,
            std::uintptr_t lens, std::int64_t rows, int heads, int kv_heads, int head_dim, int block_size,
            int max_blocks, float scale, int window, float softcap, std::uintptr_t sinks, cudaStream_t stream) {
  const int group = heads / kv_heads;
  const dim3 grid(static_cast<unsigned>(rows), kv_heads, (group + kHeadsPerBlock - 1) / kHeadsPerBlock);
  const std::size_t smem = sizeof(float) * kWarps * kHeadsPerBlock * (head_dim + 2);
  auto args = [&](auto kernel) {
    if (smem > 48 * 1024) cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                          static_cast<int>(smem)), "paged_attention smem");
    kernel<<<grid, kWarps * 32, smem, stream>>>(dptr<T>(out), dptr<const T>(q), dptr<const T>(k), dptr<const T>(v),
                                                dptr<const std::int32_t>(tables), dptr<const std::int32_t>(lens),
                                                heads, kv_heads, head_dim, block_size, max_blocks, scale, window,
                                                softcap, dptr<const float>(sinks));
  };
  const int dpl = (head_dim + 31) / 32;
  if (dpl <= 1) args(paged_attention_kernel<T, 1>);
  else if (dpl <= 2) args(paged_attention_kernel<T, 2>);
  else if (dpl <= 4) args(paged_attention_kernel<T, 4>);
  else args(paged_attention_kernel<T, 8>);
  RLHF_FAST_CUDA_CHECK_LAUNCH("paged_attention_kernel");
}

}  // namespace

void paged_attention_cuda(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                          std::uintptr_t block_tables, std::uintptr_t context_lens, std::int64_t rows, int heads,
                          int kv_heads, int head_dim, int block_size, int max_blocks, float scale, int dtype,
                          int window, float softcap, std::uintptr_t sinks, std::uintptr_t stream) {
  if (head_dim > 256) throw std::invalid_argument("paged_attention_cuda: head_dim must be <= 256");
  if (rows == 0) return;
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: launch<float>(out, q, k_cache, v_cache, block_tables, context_lens, rows, heads, kv_heads, head_dim,
                          block_size, max_blocks, scale, window, softcap, sinks, s); return;
    case 1: launch<__half>(out, q, k_cache, v_cache, block_tables, context_lens, rows, heads, kv_heads, head_dim,
                           block_size, max_blocks, scale, window, softcap, sinks, s); return;
    case 2: launch<__nv_bfloat16>(out, q, k_cache, v_cache, block_tables, context_lens, rows, heads, kv_heads,
                                  head_dim, block_size, max_blocks, scale, window, softcap, sinks, s); return;
  }
  throw std::invalid_argument("paged_attention_cuda: dtype code " + std::to_string(dtype) +
                              " unsupported (float32, float16, bfloat16)");
}

}  // namespace rlhf_fast
