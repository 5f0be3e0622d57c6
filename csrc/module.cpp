// The rlhf_fast._C module: collects every function registered with RLHF_FAST_REGISTER.
#include "common.h"
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_fast native kernels (CPU C++ and, when built with nvcc, CUDA); no libtorch linkage";
#ifdef RLHF_FAST_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
#ifdef RLHF_FAST_WITH_OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif
  m.def("max_threads", &rlhf_fast::max_threads, "OpenMP threads the CPU kernels use (1 without OpenMP)");
  m.def("set_num_threads", &rlhf_fast::set_num_threads, "threads for the CPU kernels' parallel regions (0: OpenMP's default)");
  for (auto fn : rlhf_fast::registry()) fn(m);
}
