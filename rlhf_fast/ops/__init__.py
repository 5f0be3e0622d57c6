"""Public functional API: every kernel meets autograd here, and only here.

Each op picks its backend through `rlhf_fast.backend.select`; `rlhf_fast.ops.reference` holds the PyTorch version.
"""
from rlhf_fast.backend import use_backend  # noqa: F401
