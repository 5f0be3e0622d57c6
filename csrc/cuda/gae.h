// Host launcher of the CUDA GAE scan (csrc/cuda/gae.cu); no CUDA includes, so gae.cpp can include it.
#pragma once
#include <cstdint>

namespace rlhf_fast {

// rewards, values, advantages, returns: device (total,) buffers of dtype code `dtype`; mask: (total,) uint8;
// cu_seqlens: device (nseq + 1,) int64. One block per sequence; runs on `stream`.
void gae_cuda(std::uintptr_t rewards, std::uintptr_t values, std::uintptr_t mask, std::uintptr_t cu_seqlens,
              std::int64_t nseq, std::uintptr_t advantages, std::uintptr_t returns, int dtype, double gamma,
              double lam, std::uintptr_t stream);

}  // namespace rlhf_fast
