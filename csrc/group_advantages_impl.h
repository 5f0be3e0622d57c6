// Group advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) as per-row formulas over group moments, shared
// by the CPU kernel (group_advantages.cpp) and any device kernel. The formulas and the peer functions they match
// are in rlhf_fast/ops/advantages.py.
//
// With a group's count n, mean m and std sd (Bessel, 0 for n = 1), a row's centred score is
//   x = s - m                    (n >= 2)
//   x = keep_singletons ? s : 0  (n = 1: no baseline)
// and its advantage
//   grpo:  x / (d + eps), d = sd (scale group; 1 for a kept singleton), the batch std (scale batch); x (none)
//   rloo:  x * n / (n - 1)  (x for n = 1)
//   reinforce_pp_baseline: (x - mu) * rstd, with mu, rstd of the weighted batch whitening of x.
// Moments merge with Chan, Golub & LeVeque's formula (weights may be fractional: the same formula).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RLHF_FAST_HD __host__ __device__ __forceinline__
#else
#define RLHF_FAST_HD inline
#endif

namespace rlhf_fast {
namespace group_adv {

enum Mode : int { kGrpo = 0, kRloo = 1, kReinforcePPBaseline = 2 };
enum Scale : int { kGroup = 0, kBatch = 1, kNone = 2 };

template <typename T>
struct Moments {  // count (or weight sum), mean, sum of squared deviations
  T n, mean, m2;
};

template <typename T>
RLHF_FAST_HD Moments<T> push(const Moments<T>& a, T x, T w = T(1)) {  // add one (weighted) sample
  if (w == T(0)) return a;
  const T n = a.n + w, d = x - a.mean, mean = a.mean + d * (w / n);
  return Moments<T>{n, mean, a.m2 + w * d * (x - mean)};
}

template <typename T>
RLHF_FAST_HD T bessel_std(const Moments<T>& a) {
  return a.n > T(1) ? std::sqrt(a.m2 / (a.n - T(1))) : T(0);
}

template <typename T>
RLHF_FAST_HD T centred(T s, const Moments<T>& g, bool keep_singletons) {
  if (g.n >= T(2)) return s - g.mean;
  return keep_singletons ? s : T(0);
}

// grpo and rloo (reinforce_pp_baseline whitens the centred scores afterwards).
template <typename T>
RLHF_FAST_HD T advantage(int mode, int scale, T x, const Moments<T>& g, T group_std, T batch_std, T eps,
                         bool keep_singletons) {
  const bool single = g.n < T(2);
  if (mode == kRloo) return single ? x : x * (g.n / (g.n - T(1)));
  if (scale == kNone) return x;
  const T d = scale == kBatch ? batch_std : (single && keep_singletons ? T(1) : group_std);
  return x / (d + eps);
}

// Whitening of the centred scores: (x - mu) * rsqrt(var + eps), var = m2 / (n - 1) (0 when n <= 1).
template <typename T>
RLHF_FAST_HD T whiten(T x, const Moments<T>& b, T eps) {
  const T var = b.n > T(1) ? b.m2 / (b.n - T(1)) : T(0);
  return (x - b.mean) / std::sqrt(var + eps);
}

}  // namespace group_adv
}  // namespace rlhf_fast
