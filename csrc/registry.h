// One pybind11 module, many source files: each file registers its own functions, so adding a kernel never
// touches a shared file. No libtorch: functions take data pointers (as integers), sizes and a stream.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace rlhf_fast {

using RegisterFn = void (*)(pybind11::module_&);

inline std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}

struct Registrar {
  explicit Registrar(RegisterFn fn) { registry().push_back(fn); }
};

// Pointers cross the boundary as Python ints (tensor.data_ptr()).
template <typename T>
inline T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace rlhf_fast

// Usage, at namespace scope in a .cpp file:
//   RLHF_FAST_REGISTER(gae) { m.def("gae_cpu", &gae_cpu, ...); }
#define RLHF_FAST_REGISTER(name)                                                              \
  static void rlhf_fast_register_##name(pybind11::module_& m);                                \
  static ::rlhf_fast::Registrar rlhf_fast_registrar_##name(&rlhf_fast_register_##name);       \
  static void rlhf_fast_register_##name(pybind11::module_& m)
