// The GAE recursion as affine maps, shared by the CPU (gae.cpp) and CUDA (cuda/gae.cu) kernels.
//
// Walking backwards in time we carry a state (A, G): A is the advantage of the most recent valid token and
// G = gamma*lam*A + gamma*V of that token, i.e. what a previous valid token adds on top of its own r - V.
// Token t maps the state as
//   valid:  (A, G) -> (r_t - V_t + G,  gamma*lam*(r_t - V_t) + gamma*V_t + gamma*lam*G)
//   masked: (A, G) -> (A, G)                       (no TD error, bootstrapping and advantage carried over)
// which reproduces delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next with "next" the next
// valid token (Schulman et al. 2016, eq. 16; verl's multi-turn masking). Both maps are affine with an upper
// triangular matrix, (A, G) -> (p A + q G + u, s G + w), so they compose into the same 5-number form: the
// sequential CPU loop applies them one by one, the CUDA kernel scans them in parallel.
#pragma once

#if defined(__CUDACC__)
#define RLHF_FAST_HD __host__ __device__ __forceinline__
#else
#define RLHF_FAST_HD inline
#endif

namespace rlhf_fast {
namespace gae {

template <typename T>
struct Map {  // (A, G) -> (p A + q G + u, s G + w)
  T p, q, s, u, w;
};

template <typename T>
struct State {
  T adv, g;
};

template <typename T>
RLHF_FAST_HD Map<T> identity() {
  return Map<T>{T(1), T(0), T(1), T(0), T(0)};
}

template <typename T>
RLHF_FAST_HD Map<T> token_map(T reward, T value, bool valid, T gamma, T lam) {
  if (!valid) return identity<T>();
  const T gl = gamma * lam, d = reward - value;
  return Map<T>{T(0), T(1), gl, d, gl * d + gamma * value};
}

// `second` after `first`: the map x -> second(first(x)).
template <typename T>
RLHF_FAST_HD Map<T> then(const Map<T>& first, const Map<T>& second) {
  return Map<T>{second.p * first.p, second.p * first.q + second.q * first.s,
                second.s * first.s, second.p * first.u + second.q * first.w + second.u,
                second.s * first.w + second.w};
}

template <typename T>
RLHF_FAST_HD State<T> apply(const Map<T>& m, const State<T>& x) {
  return State<T>{m.p * x.adv + m.q * x.g + m.u, m.s * x.g + m.w};
}

}  // namespace gae
}  // namespace rlhf_fast
