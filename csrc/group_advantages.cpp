// Group advantages on CPU: sequential O(B) sweeps in double over dense group indices (the formulas live in
// group_advantages_impl.h). Registers `group_advantages_cpu`. B is a batch of sequences (thousands), so one
// thread finishes in microseconds; no OpenMP team is woken.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "group_advantages_impl.h"
#include "registry.h"

namespace rlhf_fast {
namespace {

using group_adv::Moments;

// scores, adv: (B,) of dtype; index: (B,) int64 in [0, G); weights: (B,) double or 0 (all ones; read by
// reinforce_pp_baseline only); mean_out, std_out: (G,) double; count_out: (G,) int64.
void group_advantages_cpu(std::uintptr_t scores, int dtype, std::uintptr_t index, std::uintptr_t weights,
                          std::int64_t b, std::int64_t g, int mode, int scale, bool keep_singletons, double eps,
                          std::uintptr_t adv, std::uintptr_t mean_out, std::uintptr_t std_out,
                          std::uintptr_t count_out) {
  if (b < 0 || g < 0) throw std::invalid_argument("group_advantages_cpu: B and G must be >= 0");
  if (mode < group_adv::kGrpo || mode > group_adv::kReinforcePPBaseline)
    throw std::invalid_argument("group_advantages_cpu: mode code must be 0..2, got " + std::to_string(mode));
  if (scale < group_adv::kGroup || scale > group_adv::kNone)
    throw std::invalid_argument("group_advantages_cpu: scale code must be 0..2, got " + std::to_string(scale));
  if (!(eps >= 0.0)) throw std::invalid_argument("group_advantages_cpu: eps must be >= 0");
  if (dtype != kFloat32 && dtype != kFloat64 && dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument("group_advantages_cpu: unsupported dtype code " + std::to_string(dtype));
  const std::int64_t* idx = ptr<const std::int64_t>(index);
  const double* w = weights ? ptr<const double>(weights) : nullptr;
  const void* s = ptr<const void>(scores);

  // Sweep 1: per-group and batch moments of the scores.
  std::vector<Moments<double>> grp(static_cast<std::size_t>(g), Moments<double>{0.0, 0.0, 0.0});
  Moments<double> batch{0.0, 0.0, 0.0};
  for (std::int64_t i = 0; i < b; ++i) {
    const std::int64_t k = idx[i];
    if (k < 0 || k >= g)
      throw std::invalid_argument("group index " + std::to_string(k) + " of row " + std::to_string(i) +
                                  " is outside [0, " + std::to_string(g) + ")");
    const double x = load_as_double(s, dtype, i);
    grp[k] = group_adv::push(grp[k], x);
    batch = group_adv::push(batch, x);
  }
  double* mean = ptr<double>(mean_out);
  double* sd = ptr<double>(std_out);
  std::int64_t* count = ptr<std::int64_t>(count_out);
  for (std::int64_t k = 0; k < g; ++k) {
    mean[k] = grp[k].mean;
    sd[k] = group_adv::bessel_std(grp[k]);
    count[k] = static_cast<std::int64_t>(grp[k].n);
  }
  const double batch_std = group_adv::bessel_std(batch);

  // Sweep 2 (reinforce_pp_baseline): weighted moments of the centred scores over the batch.
  Moments<double> white{0.0, 0.0, 0.0};
  if (mode == group_adv::kReinforcePPBaseline) {
    for (std::int64_t i = 0; i < b; ++i) {
      const double x = group_adv::centred(load_as_double(s, dtype, i), grp[idx[i]], keep_singletons);
      white = group_adv::push(white, x, w ? w[i] : 1.0);
    }
  }
  // Sweep 3: advantages.
  constexpr double kWhitenEps = 1e-8;  // as rlhf_fast.ops.stats.WHITEN_EPS
  for (std::int64_t i = 0; i < b; ++i) {
    const Moments<double>& gm = grp[idx[i]];
    const double x = group_adv::centred(load_as_double(s, dtype, i), gm, keep_singletons);
    const double a = mode == group_adv::kReinforcePPBaseline
                         ? group_adv::whiten(x, white, kWhitenEps)
                         : group_adv::advantage(mode, scale, x, gm, sd[idx[i]], batch_std, eps, keep_singletons);
    store_from_double(ptr<void>(adv), dtype, i, a);
  }
}

}  // namespace
}  // namespace rlhf_fast

RLHF_FAST_REGISTER(group_advantages) {
  namespace py = pybind11;
  m.def("group_advantages_cpu", &rlhf_fast::group_advantages_cpu, py::call_guard<py::gil_scoped_release>(),
        "GRPO / RLOO / REINFORCE++-baseline advantages over dense group indices on CPU (pointers, sizes, codes)",
        py::arg("scores"), py::arg("dtype"), py::arg("index"), py::arg("weights"), py::arg("b"), py::arg("g"),
        py::arg("mode"), py::arg("scale"), py::arg("keep_singletons"), py::arg("eps"), py::arg("adv"),
        py::arg("mean"), py::arg("std"), py::arg("count"));
}
