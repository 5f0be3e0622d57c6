"""Every Triton kernel compiles for sm_90 (PTX, no GPU needed): the interpreter the other tests use is laxer than
the compiler. Each script runs in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {  # script -> number of kernel specialisations it compiles
    "_compile_group_adv_kernels.py": 4,
    "_compile_logprobs_kernels.py": 29,  # row kernels with/without a support threshold and soft-cap, selection
    "_compile_ppo_kernels.py": 9,
    "_compile_rollout_kernels.py": 6,
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_triton_kernels_compile_for_sm90(script):
    pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", script)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("ok ") == SCRIPTS[script], out.stdout
