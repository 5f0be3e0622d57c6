// Paged-attention decode on CPU: one online-softmax pass per (row, kv head), jobs in parallel (OpenMP). Registers
// `paged_attention_cpu` and, in a CUDA build, `paged_attention_cuda` (csrc/cuda/paged_attention.cu). The algorithm
// lives in paged_attention_impl.h.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "paged_attention_impl.h"
#include "registry.h"
#ifdef RLHF_FAST_WITH_CUDA
#include "cuda/paged_attention.h"
#endif

namespace rlhf_fast {
namespace {

struct Shape {
  std::int64_t rows;
  int heads, kv_heads, head_dim, block_size, max_blocks;
};

void check_shape(const Shape& s) {
  if (s.rows < 0 || s.heads < 1 || s.kv_heads < 1 || s.head_dim < 1 || s.block_size < 1 || s.max_blocks < 1) {
    throw std::invalid_argument("paged_attention: sizes must be positive (rows >= 0)");
  }
  if (s.heads % s.kv_heads != 0) {
    throw std::invalid_argument("paged_attention: heads (" + std::to_string(s.heads) + ") must be a multiple of "
                                "kv_heads (" + std::to_string(s.kv_heads) + ")");
  }
}

// Every context length in [1, max_blocks * block_size] and every block it reads in [0, num_blocks).
void check_tables(const Shape& s, const std::int32_t* tables, const std::int32_t* lens, std::int64_t num_blocks) {
  for (std::int64_t r = 0; r < s.rows; ++r) {
    const std::int64_t n = lens[r];
    if (n < 1 || n > static_cast<std::int64_t>(s.max_blocks) * s.block_size) {
      throw std::invalid_argument("paged_attention: context_lens[" + std::to_string(r) + "] = " + std::to_string(n) +
                                  " outside [1, max_blocks * block_size]");
    }
    for (std::int64_t b = 0; b < (n + s.block_size - 1) / s.block_size; ++b) {
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

template <typename Acc, typename T, typename Load, typename Store>
void run(const Shape& s, std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
         const std::int32_t* tables, const std::int32_t* lens, double scale, Load load, Store store) {
  const int group = s.heads / s.kv_heads;
  const std::int64_t jobs = s.rows * s.kv_heads;
  std::int64_t work = 0;
  for (std::int64_t r = 0; r < s.rows; ++r) work += static_cast<std::int64_t>(lens[r]) * s.heads * s.head_dim;
  const bool parallel = jobs > 1 && work >= kParallelMinWork;
  (void)parallel;
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    std::vector<Acc> scratch(static_cast<std::size_t>(paged::attend_scratch_size(group, s.head_dim, s.block_size)));
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (std::int64_t j = 0; j < jobs; ++j) {
      const std::int64_t r = j / s.kv_heads;
      const int kvh = static_cast<int>(j % s.kv_heads);
      const std::int64_t qoff = (r * s.heads + static_cast<std::int64_t>(kvh) * group) * s.head_dim;
      paged::attend_group<Acc>(ptr<const T>(q) + qoff, ptr<const T>(k), ptr<const T>(v),
                               tables + r * s.max_blocks, lens[r], s.block_size, s.kv_heads, s.head_dim, kvh, group,
                               static_cast<Acc>(scale), ptr<T>(out) + qoff, scratch.data(), load, store);
    }
  }
}

// out, q: (rows, heads, head_dim); k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim), all of one dtype;
// block_tables: (rows, max_blocks) int32; context_lens: (rows,) int32. Accumulates in fp32 (fp64 for fp64).
void paged_attention_cpu(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                         std::uintptr_t block_tables, std::uintptr_t context_lens, std::int64_t rows, int heads,
                         int kv_heads, int head_dim, int block_size, int max_blocks, std::int64_t num_blocks,
                         double scale, int dtype) {
  const Shape s{rows, heads, kv_heads, head_dim, block_size, max_blocks};
  check_shape(s);
  const auto* tables = ptr<const std::int32_t>(block_tables);
  const auto* lens = ptr<const std::int32_t>(context_lens);
  check_tables(s, tables, lens, num_blocks);
  switch (dtype) {
    case kFloat32:
      run<float, float>(s, out, q, k_cache, v_cache, tables, lens, scale,
                        [](const float* p, std::int64_t i) { return p[i]; },
                        [](float* p, std::int64_t i, float x) { p[i] = x; });
      return;
    case kFloat64:
      run<double, double>(s, out, q, k_cache, v_cache, tables, lens, scale,
                          [](const double* p, std::int64_t i) { return p[i]; },
                          [](double* p, std::int64_t i, double x) { p[i] = x; });
      return;
    case kBFloat16:
      run<float, std::uint16_t>(s, out, q, k_cache, v_cache, tables, lens, scale,
                                [](const std::uint16_t* p, std::int64_t i) { return bf16_to_float(p[i]); },
                                [](std::uint16_t* p, std::int64_t i, float x) { p[i] = float_to_bf16(x); });
      return;
    case kFloat16:
      run<float, std::uint16_t>(s, out, q, k_cache, v_cache, tables, lens, scale,
                                [](const std::uint16_t* p, std::int64_t i) { return fp16_to_float(p[i]); },
                                [](std::uint16_t* p, std::int64_t i, float x) { p[i] = float_to_fp16(x); });
      return;
  }
  throw std::invalid_argument("paged_attention_cpu: unsupported dtype code " + std::to_string(dtype));
}

#ifdef RLHF_FAST_WITH_CUDA
void paged_attention_cuda_checked(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache,
                                  std::uintptr_t v_cache, std::uintptr_t block_tables, std::uintptr_t context_lens,
                                  std::int64_t rows, int heads, int kv_heads, int head_dim, int block_size,
                                  int max_blocks, std::int64_t num_blocks, double scale, int dtype,
                                  std::uintptr_t stream) {
  check_shape(Shape{rows, heads, kv_heads, head_dim, block_size, max_blocks});
  (void)num_blocks;  // tables live on the device: checked there only by the caller's contract
  paged_attention_cuda(out, q, k_cache, v_cache, block_tables, context_lens, rows, heads, kv_heads, head_dim,
                       block_size, max_blocks, static_cast<float>(scale), dtype, stream);
}
#endif

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(paged_attention) {
  namespace py = pybind11;
  m.def("paged_attention_cpu", &rlhf_fast::paged_attention_cpu, py::call_guard<py::gil_scoped_release>(),
        "paged-attention decode on CPU (pointers, rows, heads, kv_heads, head_dim, block_size, max_blocks, "
        "num_blocks, scale, dtype code)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"));
#ifdef RLHF_FAST_WITH_CUDA
  m.def("paged_attention_cuda", &rlhf_fast::paged_attention_cuda_checked, py::call_guard<py::gil_scoped_release>(),
        "paged-attention decode on CUDA (one thread block per (row, kv head), warps split the keys)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"));
#endif
}
