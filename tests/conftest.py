"""Test setup: the Triton kernels run under the interpreter on CPU tensors when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _tiny import one_thread, tiny_task  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # RLHF_FAST_GPU_TESTS_ON_CPU=1 (the `bench.gpu_check --dry-run`): the gpu tests run on CPU tensors, Triton
    # under the interpreter, at their small shapes only (tests/_gpu.py skips the rest).
    if torch.cuda.is_available() or os.environ.get("RLHF_FAST_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tol(dtype: torch.dtype) -> dict:
    """Default comparison tolerance against a float64 reference, by input dtype."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=1e-5, rtol=1e-5),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=5e-3, rtol=5e-3),
    }[dtype]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(root, tokenizer, data paths) of the tiny task (`_tiny`), built once per test module."""
    root = tmp_path_factory.mktemp("task")
    with one_thread():
        yield (root, *tiny_task(root))
