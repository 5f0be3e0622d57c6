"""Triton kernels and their launchers (no autograd); installed as `rlhf_fast.kernels`.

Import as `from rlhf_fast.kernels import ...`, never as a top-level `kernels` (a different PyPI package).
Modules here import `triton` at import time: import them only after checking `rlhf_fast.backend.triton_available()`.
"""
