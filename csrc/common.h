// Shared helpers for the CPU C++ kernels: dtype codes (must match rlhf_fast/_native.py), half/bfloat16
// conversion without libtorch, and a portable parallel-for.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef RLHF_FAST_WITH_OPENMP
#include <omp.h>
#endif

namespace rlhf_fast {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline float bf16_to_float(std::uint16_t h) {
  std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

inline float fp16_to_float(std::uint16_t h) {
  std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint16_t float_to_fp16(float f) {  // round to nearest even
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  std::uint32_t sign = (x >> 16) & 0x8000u;
  std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (ax < 0x38800000u) {  // subnormal or zero in fp16
    float af;
    std::memcpy(&af, &ax, 4);
    float scaled = af * 16777216.0f;  // 2^24: fp16 subnormal unit
    std::uint32_t m = static_cast<std::uint32_t>(scaled);
    float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return static_cast<std::uint16_t>(sign | m);
  }
  std::uint32_t e = ((ax >> 23) - 127 + 15) << 10;
  std::uint32_t mant = ax & 0x7fffffu;
  std::uint32_t h = e | (mant >> 13);
  std::uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

// Load element i of a float buffer of any supported dtype as float / double.
inline double load_as_double(const void* p, int dtype, std::int64_t i) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(p)[i];
    case kFloat64: return static_cast<const double*>(p)[i];
    case kBFloat16: return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case kFloat16: return fp16_to_float(static_cast<const std::uint16_t*>(p)[i]);
  }
  throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
}

inline void store_from_double(void* p, int dtype, std::int64_t i, double v) {
  switch (dtype) {
    case kFloat32: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case kFloat64: static_cast<double*>(p)[i] = v; return;
    case kBFloat16: static_cast<std::uint16_t*>(p)[i] = float_to_bf16(static_cast<float>(v)); return;
    case kFloat16: static_cast<std::uint16_t*>(p)[i] = float_to_fp16(static_cast<float>(v)); return;
  }
  throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
}

// Threads a kernel's parallel region uses: torch's intra-op thread count, which rlhf_fast/_native.py passes here
// before each call (`set_num_threads`). The extension's OpenMP runtime is the system's, not the copy torch loads, so
// `torch.set_num_threads` never reaches it and a one-thread process would otherwise run these regions on every core.
// 0 (nothing set): OpenMP's own default.
inline std::atomic<int> g_num_threads{0};

inline void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

inline int max_threads() {
#ifdef RLHF_FAST_WITH_OPENMP
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace rlhf_fast
