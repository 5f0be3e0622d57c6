// GAE on CUDA: one block per sequence, a chunked reverse scan over the affine maps of gae_impl.h.
//
// Per chunk of kThreads * kItems tokens (walked from the sequence's end to its start): each thread composes the
// maps of its kItems consecutive tokens; a Hillis-Steele scan in shared memory (in reversed thread order, since
// time runs backwards) gives each thread the composition of all later threads' maps; applying that to the
// state carried in from the later chunk gives the thread's entry state, from which it replays its tokens and
// writes advantages and returns. The earliest thread's final state is the carry into the next (earlier) chunk.
// Reads r, V, mask once and writes A, R once: memory bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../gae_impl.h"
#include "cuda_utils.cuh"
#include "gae.h"

namespace rlhf_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // tokens per thread per chunk: a chunk is 2048 tokens

template <typename T>
struct Io;
template <>
struct Io<float> {
  using Acc = float;
  static __device__ __forceinline__ float load(const float* p, std::int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, std::int64_t i, float x) { p[i] = x; }
};
template <>
struct Io<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(const double* p, std::int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(double* p, std::int64_t i, double x) { p[i] = x; }
};
template <>
struct Io<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(const __half* p, std::int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ void store(__half* p, std::int64_t i, float x) { p[i] = __float2half_rn(x); }
};
template <>
struct Io<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p, std::int64_t i) {
    return __bfloat162float(p[i]);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, std::int64_t i, float x) {
    p[i] = __float2bfloat16_rn(x);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gae_kernel(const T* __restrict__ rewards, const T* __restrict__ values,
                                                       const std::uint8_t* __restrict__ mask,
                                                       const std::int64_t* __restrict__ cu, T* __restrict__ adv,
                                                       T* __restrict__ ret, float gamma_f, float lam_f,
                                                       double gamma_d, double lam_d) {
  using Acc = typename Io<T>::Acc;
  using MapA = gae::Map<Acc>;
  __shared__ MapA scan[kThreads];
  __shared__ gae::State<Acc> carry_s;
  const Acc gamma = sizeof(Acc) == 8 ? Acc(gamma_d) : Acc(gamma_f);
  const Acc lam = sizeof(Acc) == 8 ? Acc(lam_d) : Acc(lam_f);
  const std::int64_t begin = cu[blockIdx.x], end = cu[blockIdx.x + 1];
  const int tid = threadIdx.x;
  const int j = kThreads - 1 - tid;  // scan position: j = 0 is the latest thread in time
  constexpr std::int64_t kChunk = std::int64_t(kThreads) * kItems;
  gae::State<Acc> carry{Acc(0), Acc(0)};

  for (std::int64_t chunk_end = end; chunk_end > begin; chunk_end -= kChunk) {
    const std::int64_t chunk_begin = chunk_end - kChunk > begin ? chunk_end - kChunk : begin;
    const std::int64_t base = chunk_end - kChunk + std::int64_t(tid) * kItems;  // may start before chunk_begin
    Acc r[kItems], v[kItems];
    bool valid[kItems];
    MapA agg = gae::identity<Acc>();
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      const std::int64_t t = base + k;
      const bool inside = t >= chunk_begin;
      r[k] = inside ? Io<T>::load(rewards, t) : Acc(0);
      v[k] = inside ? Io<T>::load(values, t) : Acc(0);
      valid[k] = inside && mask[t] != 0;
      agg = gae::then(agg, gae::token_map<Acc>(r[k], v[k], valid[k], gamma, lam));
    }
    // Inclusive scan over j: scan[j] = agg_j after agg_{j-1} after ... after agg_0 (agg_0 applied first).
    scan[j] = agg;
    __syncthreads();
    for (int d = 1; d < kThreads; d <<= 1) {
      MapA cur = scan[j];
      if (j >= d) cur = gae::then(scan[j - d], cur);
      __syncthreads();
      scan[j] = cur;
      __syncthreads();
    }
    gae::State<Acc> st = j == 0 ? carry : gae::apply(scan[j - 1], carry);
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      const std::int64_t t = base + k;
      if (t >= chunk_begin) {
        st = gae::apply(gae::token_map<Acc>(r[k], v[k], valid[k], gamma, lam), st);
        Io<T>::store(adv, t, st.adv);
        Io<T>::store(ret, t, st.adv + v[k]);
      }
    }
    if (j == kThreads - 1) carry_s = st;  // the earliest thread ends at the chunk's first token
    __syncthreads();
    carry = carry_s;
    __syncthreads();  // scan[] and carry_s are rewritten by the next chunk
  }
}

template <typename T>
void launch(std::uintptr_t r, std::uintptr_t v, std::uintptr_t m, std::uintptr_t cu, std::int64_t nseq,
            std::uintptr_t a, std::uintptr_t ret, double gamma, double lam, cudaStream_t stream) {
  gae_kernel<T><<<static_cast<unsigned>(nseq), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(r), reinterpret_cast<const T*>(v), reinterpret_cast<const std::uint8_t*>(m),
      reinterpret_cast<const std::int64_t*>(cu), reinterpret_cast<T*>(a), reinterpret_cast<T*>(ret),
      static_cast<float>(gamma), static_cast<float>(lam), gamma, lam);
  RLHF_FAST_CUDA_CHECK_LAUNCH("gae_kernel");
}

}  // namespace

void gae_cuda(std::uintptr_t rewards, std::uintptr_t values, std::uintptr_t mask, std::uintptr_t cu_seqlens,
              std::int64_t nseq, std::uintptr_t advantages, std::uintptr_t returns, int dtype, double gamma,
              double lam, std::uintptr_t stream) {
  if (nseq == 0) return;
  if (nseq > 2147483647LL) throw std::invalid_argument("gae_cuda: too many sequences for one grid");
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: launch<float>(rewards, values, mask, cu_seqlens, nseq, advantages, returns, gamma, lam, s); return;
    case 1: launch<__half>(rewards, values, mask, cu_seqlens, nseq, advantages, returns, gamma, lam, s); return;
    case 2:
      launch<__nv_bfloat16>(rewards, values, mask, cu_seqlens, nseq, advantages, returns, gamma, lam, s);
      return;
    case 3: launch<double>(rewards, values, mask, cu_seqlens, nseq, advantages, returns, gamma, lam, s); return;
  }
  throw std::invalid_argument("gae_cuda: unsupported dtype code " + std::to_string(dtype));
}

}  // namespace rlhf_fast
