"""The package layout and the native build."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import rlhf_fast
from rlhf_fast import _native, backend


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rlhf_fast.__file__)))


def test_kernels_is_a_subpackage_and_no_top_level_kernels_is_used():
    spec = importlib.util.find_spec("rlhf_fast.kernels")
    assert spec is not None and spec.origin.endswith(os.path.join("triton-kernels", "__init__.py"))
    offenders = []
    for d in ("rlhf_fast", "triton-kernels", "tests", "bench"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    if "\nimport kernels" in text or "\nfrom kernels" in text:
                        offenders.append(os.path.join(dirpath, f))
    assert not offenders, f"top-level `kernels` imports: {offenders}"


def _top_level_import_names(root: str) -> dict[str, str]:
    """{import name: entry} for what `import NAME` finds in `root` when root is on sys.path (pytest, `python -m`,
    torchrun started there): regular packages, modules, and folders that would become namespace packages."""
    names = {}
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith("."):
            continue
        if os.path.isdir(path):
            if entry.isidentifier():
                names[entry] = entry + "/"
        else:
            base, ext = os.path.splitext(entry)
            if ext in (".py", ".so", ".pyd") and base.split(".")[0].isidentifier():
                names[base.split(".")[0]] = entry
    return names


def test_no_top_level_entry_of_the_repo_shadows_an_installed_distribution():
    """Any folder or module in the repo root is importable by that name from the root (the current directory or the
    script's directory is sys.path[0]); one named like an installed distribution's package hides it. That happened:
    `kernels/` hid Hugging Face's `kernels`, which transformers 5 imports, and every test run failed."""
    import importlib.metadata as md

    installed = md.packages_distributions()  # {top-level import name: [distributions]}
    ours = _top_level_import_names(ROOT)
    clashes = {name: (entry, installed[name]) for name, entry in ours.items()
               if name in installed and name != "rlhf_fast"}
    assert not clashes, f"repo-root entries shadow installed distributions: {clashes}"


def test_transformers_imports_from_the_repo_root():
    """`import transformers.activations` (which imports the `kernels` distribution on transformers 5) and the Triton
    kernels, with the repo root first on sys.path, as `python -m` / pytest / torchrun started there have it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import transformers.activations, rlhf_fast.models, "
            "rlhf_fast.kernels; import importlib.util as u; s = u.find_spec('kernels'); "
            "print(s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "None" or not origin.startswith(ROOT + os.sep), f"`kernels` resolves inside the repo: {origin}"


def test_native_extension_built():
    if os.environ.get("RLHF_FAST_EXPECT_NATIVE", "1") == "0":
        pytest.skip("native build not expected here")
    assert _native.available(), _native.IMPORT_ERROR


def test_native_kernels_follow_torch_thread_count():
    """The CPU kernels run on torch.get_num_threads() threads, though _C's OpenMP runtime is not the one torch
    loads (torch.set_num_threads never reaches it): a one-thread process must not run them on every core. Results
    do not depend on the thread count."""
    if not (_native.has("set_num_threads") and _native.built_with_openmp()):
        pytest.skip("native extension without OpenMP")
    import torch

    from rlhf_fast import ops

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(64, 4, 32, generator=gen)
    k, v = torch.randn(2, 96, 16, 2, 32, generator=gen).unbind(0)
    tables = torch.randint(0, 96, (64, 8), generator=gen, dtype=torch.int32)
    lens = torch.randint(1, 8 * 16 + 1, (64,), generator=gen, dtype=torch.int32)
    before = torch.get_num_threads()
    outs = {}
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs[n] = ops.paged_attention(q, k, v, tables, lens)  # large enough for the parallel path
            assert _native._C.max_threads() == n
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1], outs[2])


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
