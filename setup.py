"""Build of rlhf_fast._C: CPU C++ always, CUDA when nvcc is found (RLHF_FAST_CUDA=auto|0|1).

The extension links no libtorch: kernels take raw pointers, sizes and a stream, so one build works with any
torch >= 2.4 and torch never enters the isolated build environment. A failed native build still installs the
pure-Python package and says so.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"rlhf_fast build: {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    mode = os.environ.get("RLHF_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RLHF_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if nvcc and os.path.exists(nvcc):
        return os.path.realpath(nvcc) if not home else nvcc
    if mode == "1":
        raise SystemExit("RLHF_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return None


def _cuda_home(nvcc):
    # nvcc may be a wrapper script; ask it where the toolkit is.
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{nvcc} --version failed: {out.stderr}")
    for cand in (os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda"):
        if cand and glob.glob(os.path.join(cand, "lib*", "libcudart_static.a")):
            return cand
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if glob.glob(os.path.join(cand, "lib*", "libcudart_static.a")):
            return cand
    raise RuntimeError("found nvcc but no libcudart_static.a beside it; set CUDA_HOME")


def _has_openmp(compiler):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            objs = compiler.compile([src], output_dir=d, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(d, "omp"), extra_postargs=["-fopenmp"])
            return True
        except Exception:
            return False


class BuildExt(build_ext):
    def build_extensions(self):
        ext = self.extensions[0]
        try:
            self._configure(ext)
            super().build_extensions()
        except Exception as e:  # noqa: BLE001 - any failure means "no native backend", not "no install"
            if os.environ.get("RLHF_FAST_REQUIRE_NATIVE") == "1":
                raise
            _log(f"native extension NOT built ({type(e).__name__}: {e}); "
                 "rlhf_fast will use its Triton and PyTorch backends only")

    def _configure(self, ext):
        import pybind11

        ext.include_dirs += [pybind11.get_include(), os.path.join(ROOT, "csrc")]
        # -fno-wrapv: Python's own CFLAGS carry -fwrapv, which stops GCC vectorising loops with int indices.
        cflags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-DNDEBUG", "-fno-wrapv"]
        if sys.platform != "darwin":
            cflags.append("-march=x86-64-v2" if os.uname().machine == "x86_64" else "-O3")
        ldflags = []
        if _has_openmp(self.compiler):
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
            cflags.append("-DRLHF_FAST_WITH_OPENMP")
            _log("OpenMP: yes")
        else:
            _log("OpenMP: no (CPU kernels run single-threaded)")
        nvcc = _find_nvcc()
        if nvcc:
            objs = self._compile_cuda(nvcc)
            home = _cuda_home(nvcc)
            ext.extra_objects += objs
            ext.library_dirs += glob.glob(os.path.join(home, "lib64")) + glob.glob(os.path.join(home, "lib"))
            # Static cudart: importing _C needs no CUDA runtime or driver on machines without a GPU.
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            cflags.append("-DRLHF_FAST_WITH_CUDA")
            _log(f"CUDA: yes ({nvcc}, archs {self._archs()})")
        else:
            _log("CUDA: no (nvcc not found or RLHF_FAST_CUDA=0); CPU kernels only")
        ext.extra_compile_args += cflags
        ext.extra_link_args += ldflags

    @staticmethod
    def _archs():
        return [a.strip() for a in os.environ.get("RLHF_FAST_CUDA_ARCHS", "80;90a").split(";") if a.strip()]

    def _compile_cuda(self, nvcc):
        sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        out_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        os.makedirs(out_dir, exist_ok=True)
        gencode = []
        for a in self._archs():
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        base = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                "-I" + os.path.join(ROOT, "csrc"), *gencode]

        def one(src):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [*base, "-c", src, "-o", obj]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {os.path.relpath(src, ROOT)}:\n{r.stderr[-4000:]}")
            return obj

        jobs = max(1, min(len(sources), os.cpu_count() or 1))
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, sources))


def _cpp_sources():
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))


# `triton-kernels/` (Triton only) installs as rlhf_fast.kernels. The folder's name is not a Python identifier on
# purpose: a top-level `kernels/` package in the repo root shadowed Hugging Face's `kernels` distribution (which
# transformers 5 imports) for every interpreter started there (pytest, `python -m`, torchrun).
_PACKAGES = sorted(find_packages(include=["rlhf_fast", "rlhf_fast.*"]) + ["rlhf_fast.kernels"])

setup(
    packages=_PACKAGES,
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.kernels": "triton-kernels"},
    ext_modules=[Extension("rlhf_fast._C", sources=_cpp_sources(), language="c++")],
    cmdclass={"build_ext": BuildExt},
)
