// Helpers shared by the .cu files (compiled by nvcc only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rlhf_fast {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace rlhf_fast

#define RLHF_FAST_CUDA_CHECK_LAUNCH(what) ::rlhf_fast::cuda_check(cudaGetLastError(), what)
