// The clipped value loss on CPU: a forward writing per-row partial sums (the layout of the Triton kernels in
// kernels/ppo_losses.py, one chunk per row) and a backward writing d loss / d values scaled by a per-row weight.
// Math in double; rows in parallel (OpenMP) when large. (The policy loss has no CPU kernel: its exp per token
// is faster in PyTorch's vectorised composition than in a scalar loop, so CPU uses that.)
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "common.h"
#include "registry.h"

namespace rlhf_fast {
namespace {

constexpr std::int64_t kParallelMinTokens = std::int64_t(1) << 18;
enum Value { V_LOSS, V_COUNT, V_CLIPPED, V_VSUM, V_NONFINITE, V_RMEAN, V_RM2, V_EMEAN, V_EM2, V_K };

struct Input {  // one (rows, T) tensor of any float dtype
  const void* p;
  int dtype;
  double operator[](std::int64_t i) const { return load_as_double(p, dtype, i); }
};

template <typename T>
struct Typed {  // the same for one known dtype: a plain load the compiler can pipeline
  const T* p;
  double operator[](std::int64_t i) const { return static_cast<double>(p[i]); }
};

// Calls fn(a, b, c) with typed loaders when all three tensors are float32 (or all float64), generic ones otherwise.
template <typename Fn>
void with_inputs(std::uintptr_t a, int dta, std::uintptr_t b, int dtb, std::uintptr_t c, int dtc, Fn fn) {
  if (dta == kFloat32 && dtb == kFloat32 && dtc == kFloat32) {
    fn(Typed<float>{ptr<const float>(a)}, Typed<float>{ptr<const float>(b)}, Typed<float>{ptr<const float>(c)});
  } else if (dta == kFloat64 && dtb == kFloat64 && dtc == kFloat64) {
    fn(Typed<double>{ptr<const double>(a)}, Typed<double>{ptr<const double>(b)}, Typed<double>{ptr<const double>(c)});
  } else {
    fn(Input{ptr<const void>(a), dta}, Input{ptr<const void>(b), dtb}, Input{ptr<const void>(c), dtc});
  }
}

// grad[i] = x in grad's dtype, with a plain store for float32 / float64.
inline void store_grad(void* g, int dtype, std::int64_t i, double x) {
  if (dtype == kFloat32) {
    static_cast<float*>(g)[i] = static_cast<float>(x);
  } else if (dtype == kFloat64) {
    static_cast<double*>(g)[i] = x;
  } else {
    store_from_double(g, dtype, i, x);
  }
}

struct ValueTok {
  bool valid, bad, clipped;
  double v, ret, loss, dv;
};

// l = max((v - R)^2, (v_old + clamp(v - v_old, -c, c) - R)^2) / 2; dl/dv = v - R on the first branch,
// (vc - R) on the second when |v - v_old| <= c, else 0. Invalid tokens: v = R = 0, loss and gradient 0.
inline ValueTok value_token(double v, double vo, double ret, bool m, double clip, bool has_clip) {
  ValueTok o;
  const bool finite = std::isfinite(v) & std::isfinite(vo) & std::isfinite(ret);
  o.valid = m & finite;
  o.bad = m & !finite;
  v = o.valid ? v : 0.0;
  vo = o.valid ? vo : 0.0;
  ret = o.valid ? ret : 0.0;
  o.v = v;
  o.ret = ret;
  const double l1 = (v - ret) * (v - ret);
  const bool inside = !has_clip | (std::fabs(v - vo) <= clip);
  const double vc = has_clip ? vo + std::min(std::max(v - vo, -clip), clip) : v;
  const double l2 = (vc - ret) * (vc - ret);
  o.loss = 0.5 * std::max(l1, l2);
  o.clipped = (l2 > l1) & !inside;
  o.dv = l1 >= l2 ? v - ret : (inside ? vc - ret : 0.0);
  return o;
}

template <typename RowFn>
void for_rows(std::int64_t rows, std::int64_t T, RowFn fn) {
  const bool parallel = rows > 1 && rows * T >= kParallelMinTokens;
  (void)parallel;
#ifdef RLHF_FAST_WITH_OPENMP
#pragma omp parallel for schedule(static) if (parallel) num_threads(max_threads())
#endif
  for (std::int64_t r = 0; r < rows; ++r) fn(r);
}

void check(std::int64_t rows, std::int64_t T) {
  if (rows < 0 || T < 0) throw std::invalid_argument("rows and T must be >= 0");
}

// partials: (rows, V_K) float64; *MEAN / *M2: the row's mean and centred sum of squares (two passes).
void value_partials_cpu(std::uintptr_t values, int dt_v, std::uintptr_t old_values, int dt_vo, std::uintptr_t returns,
                        int dt_ret, std::uintptr_t mask, std::int64_t rows, std::int64_t T, double clip, bool has_clip,
                        std::uintptr_t partials) {
  check(rows, T);
  const std::uint8_t* m = ptr<const std::uint8_t>(mask);
  double* out = ptr<double>(partials);
  with_inputs(values, dt_v, old_values, dt_vo, returns, dt_ret, [&](auto v, auto vo, auto rt) {
  for_rows(rows, T, [&](std::int64_t r) {
    double s[V_K] = {0};
    double r_sum = 0, e_sum = 0;
    for (std::int64_t i = r * T; i < (r + 1) * T; ++i) {  // pass 1: sums (invalid tokens add 0)
      const ValueTok t = value_token(v[i], vo[i], rt[i], m[i] != 0, clip, has_clip);
      s[V_NONFINITE] += t.bad;
      s[V_COUNT] += t.valid;
      s[V_LOSS] += t.loss;
      s[V_CLIPPED] += t.clipped;
      s[V_VSUM] += t.v;
      r_sum += t.ret;
      e_sum += t.ret - t.v;
    }
    const double inv = 1.0 / std::max(s[V_COUNT], 1.0);
    s[V_RMEAN] = r_sum * inv;
    s[V_EMEAN] = e_sum * inv;
    for (std::int64_t i = r * T; i < (r + 1) * T; ++i) {  // pass 2 (row in cache): centred sums of squares
      const ValueTok t = value_token(v[i], vo[i], rt[i], m[i] != 0, clip, has_clip);
      const double dr = t.ret - s[V_RMEAN], de = t.ret - t.v - s[V_EMEAN];
      s[V_RM2] += t.valid ? dr * dr : 0.0;
      s[V_EM2] += t.valid ? de * de : 0.0;
    }
    std::copy(s, s + V_K, out + r * V_K);
  });
  });
}

void value_backward_cpu(std::uintptr_t values, int dt_v, std::uintptr_t old_values, int dt_vo, std::uintptr_t returns,
                        int dt_ret, std::uintptr_t mask, std::int64_t rows, std::int64_t T, double clip, bool has_clip,
                        std::uintptr_t row_weight, std::uintptr_t grad, int dt_grad) {
  check(rows, T);
  const std::uint8_t* m = ptr<const std::uint8_t>(mask);
  const double* w = ptr<const double>(row_weight);
  void* g = ptr<void>(grad);
  with_inputs(values, dt_v, old_values, dt_vo, returns, dt_ret, [&](auto v, auto vo, auto rt) {
  for_rows(rows, T, [&](std::int64_t r) {
    for (std::int64_t i = r * T; i < (r + 1) * T; ++i) {
      store_grad(g, dt_grad, i, w[r] * value_token(v[i], vo[i], rt[i], m[i] != 0, clip, has_clip).dv);
    }
  });
  });
}

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(value_loss) {
  namespace py = pybind11;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("ppo_value_partials_cpu", &rlhf_fast::value_partials_cpu, nogil,
        "clipped value loss per-row partial sums (rows, 9) float64", py::arg("values"), py::arg("dt_v"),
        py::arg("old_values"), py::arg("dt_vo"), py::arg("returns"), py::arg("dt_ret"), py::arg("mask"),
        py::arg("rows"), py::arg("T"), py::arg("clip"), py::arg("has_clip"), py::arg("partials"));
  m.def("ppo_value_backward_cpu", &rlhf_fast::value_backward_cpu, nogil,
        "clipped value loss gradient w.r.t. values, scaled per row", py::arg("values"), py::arg("dt_v"),
        py::arg("old_values"), py::arg("dt_vo"), py::arg("returns"), py::arg("dt_ret"), py::arg("mask"),
        py::arg("rows"), py::arg("T"), py::arg("clip"), py::arg("has_clip"), py::arg("row_weight"), py::arg("grad"),
        py::arg("dt_grad"));
}
