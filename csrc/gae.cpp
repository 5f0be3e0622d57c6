// GAE on CPU: one reverse sweep per sequence, two sequences interleaved per thread, pairs of sequences in parallel
// (OpenMP). Registers `gae_cpu` and, in a CUDA build, `gae_cuda` (csrc/cuda/gae.cu). The recursion itself lives in
// gae_impl.h.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common.h"
#include "gae_impl.h"
#include "registry.h"
#ifdef RLHF_FAST_WITH_CUDA
#include "cuda/gae.h"
#endif

namespace rlhf_fast {
namespace {

void check_coefs(double gamma, double lam) {
  if (!(gamma >= 0.0 && gamma <= 1.0)) throw std::invalid_argument("gamma must be in [0, 1], got " + std::to_string(gamma));
  if (!(lam >= 0.0 && lam <= 1.0)) throw std::invalid_argument("lam must be in [0, 1], got " + std::to_string(lam));
}

// A NaN result's sign and payload depend on which operand the compiled instruction sequence hands the FPU first
// (x86 keeps the first NaN operand's; an invalid operation such as inf - inf gives the negative default NaN), so
// they change with code generation (the same step inlined into a pair sweep or a lone one, a CUDA-enabled build).
// Every NaN is stored as the one positive quiet NaN: the output bits depend only on the inputs.
inline double canonical_nan(double x) { return x != x ? std::numeric_limits<double>::quiet_NaN() : x; }

// Token t of one sequence, walking backwards: the state (A, G) goes through t's map and A, A + V are stored.
template <typename Load, typename Store>
inline void step(const void* rewards, const void* values, const std::uint8_t* mask, std::int64_t t, void* adv,
                 void* ret, double gamma, double lam, Load load, Store store, gae::State<double>& st) {
  const double v = load(values, t);
  st = gae::apply(gae::token_map<double>(load(rewards, t), v, mask[t] != 0, gamma, lam), st);
  store(adv, t, canonical_nan(st.adv));
  store(ret, t, canonical_nan(st.adv + v));
}

// Sequences a = [cu[0], cu[1]) and b = [cu[1], cu[2]) swept together, one token of each per iteration, over their
// common length, then the longer one alone. One sequence's recursion is a chain of dependent multiply-adds
// (latency bound, ~8 cycles a token); two independent chains overlap, 1.6x the tokens per second on one core. Each
// token still sees exactly the operations of a one-by-one sweep, so the outputs are bitwise the same.
template <typename Load, typename Store>
void sweep_pair(const void* r, const void* v, const std::uint8_t* m, const std::int64_t* cu, void* adv, void* ret,
                double gamma, double lam, Load load, Store store) {
  const std::int64_t ea = cu[1], eb = cu[2];
  const std::int64_t n = std::min(ea - cu[0], eb - cu[1]);
  gae::State<double> sa{0.0, 0.0}, sb{0.0, 0.0};
  for (std::int64_t k = 1; k <= n; ++k) {
    step(r, v, m, ea - k, adv, ret, gamma, lam, load, store, sa);
    step(r, v, m, eb - k, adv, ret, gamma, lam, load, store, sb);
  }
  for (std::int64_t t = ea - n - 1; t >= cu[0]; --t) step(r, v, m, t, adv, ret, gamma, lam, load, store, sa);
  for (std::int64_t t = eb - n - 1; t >= cu[1]; --t) step(r, v, m, t, adv, ret, gamma, lam, load, store, sb);
}

// Below this many tokens one thread is faster than waking a team (and far safer on a loaded machine).
constexpr std::int64_t kParallelMinTokens = std::int64_t(1) << 18;

template <typename Load, typename Store>
void run_all(std::uintptr_t r, std::uintptr_t v, std::uintptr_t m, const std::int64_t* cu, std::int64_t nseq,
             std::uintptr_t adv, std::uintptr_t ret, double gamma, double lam, Load load, Store store) {
  const std::int64_t npairs = nseq / 2;
  const bool parallel = npairs > 1 && cu[nseq] - cu[0] >= kParallelMinTokens;
  (void)parallel;
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 2) if (parallel) num_threads(max_threads())
#endif
  for (std::int64_t i = 0; i < npairs; ++i) {
    sweep_pair(ptr<const void>(r), ptr<const void>(v), ptr<const std::uint8_t>(m), cu + 2 * i, ptr<void>(adv),
               ptr<void>(ret), gamma, lam, load, store);
  }
  if (nseq % 2) {  // the odd last sequence alone
    gae::State<double> st{0.0, 0.0};
    for (std::int64_t t = cu[nseq] - 1; t >= cu[nseq - 1]; --t) {
      step(ptr<const void>(r), ptr<const void>(v), ptr<const std::uint8_t>(m), t, ptr<void>(adv), ptr<void>(ret),
           gamma, lam, load, store, st);
    }
  }
}

// rewards, values, advantages, returns: (total,) of one dtype; mask: (total,) uint8; cu_seqlens: (nseq + 1,)
// int64, sequence i = [cu[i], cu[i+1]). Computes in double.
void gae_cpu(std::uintptr_t rewards, std::uintptr_t values, std::uintptr_t mask, std::uintptr_t cu_seqlens,
             std::int64_t nseq, std::uintptr_t advantages, std::uintptr_t returns, int dtype, double gamma,
             double lam) {
  check_coefs(gamma, lam);
  if (nseq < 0) throw std::invalid_argument("nseq must be >= 0");
  const std::int64_t* cu = ptr<const std::int64_t>(cu_seqlens);
  for (std::int64_t i = 0; i < nseq; ++i) {
    if (cu[i + 1] < cu[i]) throw std::invalid_argument("cu_seqlens must be non-decreasing");
  }
  switch (dtype) {
    case kFloat32:
      run_all(rewards, values, mask, cu, nseq, advantages, returns, gamma, lam,
              [](const void* p, std::int64_t i) { return static_cast<double>(static_cast<const float*>(p)[i]); },
              [](void* p, std::int64_t i, double x) { static_cast<float*>(p)[i] = static_cast<float>(x); });
      return;
    case kFloat64:
      run_all(rewards, values, mask, cu, nseq, advantages, returns, gamma, lam,
              [](const void* p, std::int64_t i) { return static_cast<const double*>(p)[i]; },
              [](void* p, std::int64_t i, double x) { static_cast<double*>(p)[i] = x; });
      return;
    case kFloat16:
    case kBFloat16:
      run_all(rewards, values, mask, cu, nseq, advantages, returns, gamma, lam,
              [dtype](const void* p, std::int64_t i) { return load_as_double(p, dtype, i); },
              [dtype](void* p, std::int64_t i, double x) { store_from_double(p, dtype, i, x); });
      return;
  }
  throw std::invalid_argument("gae_cpu: unsupported dtype code " + std::to_string(dtype));
}

#ifdef RLHF_FAST_WITH_CUDA
void gae_cuda_checked(std::uintptr_t rewards, std::uintptr_t values, std::uintptr_t mask, std::uintptr_t cu_seqlens,
                      std::int64_t nseq, std::uintptr_t advantages, std::uintptr_t returns, int dtype, double gamma,
                      double lam, std::uintptr_t stream) {
  check_coefs(gamma, lam);
  if (nseq < 0) throw std::invalid_argument("nseq must be >= 0");
  gae_cuda(rewards, values, mask, cu_seqlens, nseq, advantages, returns, dtype, gamma, lam, stream);
}
#endif

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(gae) {
  namespace py = pybind11;
  m.def("gae_cpu", &rlhf_fast::gae_cpu, py::call_guard<py::gil_scoped_release>(),
        "GAE reverse sweep over packed sequences on CPU (pointers, nseq, dtype code, gamma, lam)",
        py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("nseq"),
        py::arg("advantages"), py::arg("returns"), py::arg("dtype"), py::arg("gamma"), py::arg("lam"));
#ifdef RLHF_FAST_WITH_CUDA
  m.def("gae_cuda", &rlhf_fast::gae_cuda_checked, py::call_guard<py::gil_scoped_release>(),
        "GAE chunked block scan over packed sequences on CUDA (one block per sequence)", py::arg("rewards"),
        py::arg("values"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("nseq"), py::arg("advantages"),
        py::arg("returns"), py::arg("dtype"), py::arg("gamma"), py::arg("lam"), py::arg("stream"));
#endif
}
