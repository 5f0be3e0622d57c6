"""The package layout and the native build."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import rlhf_fast
from rlhf_fast import _native, backend


def test_kernels_is_a_subpackage_and_no_top_level_kernels_is_used():
    spec = importlib.util.find_spec("rlhf_fast.kernels")
    assert spec is not None and spec.origin.endswith(os.path.join("kernels", "__init__.py"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(rlhf_fast.__file__)))
    offenders = []
    for d in ("rlhf_fast", "kernels", "tests", "bench"):
        for dirpath, _, files in os.walk(os.path.join(root, d)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    if "\nimport kernels" in text or "\nfrom kernels" in text:
                        offenders.append(os.path.join(dirpath, f))
    assert not offenders, f"top-level `kernels` imports: {offenders}"


def test_native_extension_built():
    if os.environ.get("RLHF_FAST_EXPECT_NATIVE", "1") == "0":
        pytest.skip("native build not expected here")
    assert _native.available(), _native.IMPORT_ERROR


def test_cuda_sources_compiled_when_nvcc_present():
    """Where nvcc exists (and RLHF_FAST_CUDA is not 0) the CUDA sources must have compiled into _C."""
    if shutil.which("nvcc") is None or os.environ.get("RLHF_FAST_CUDA") == "0":
        pytest.skip("no nvcc here")
    assert _native.built_with_cuda(), "nvcc is present but rlhf_fast._C was built without its CUDA kernels"


def test_forcing_an_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND"):
        backend.forced_backend()


def test_env_command_runs():
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "env"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "ops_on_cpu" in out.stdout
