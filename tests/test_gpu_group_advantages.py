"""GPU: the Triton group_advantages kernel (GRPO / Dr. GRPO / RLOO / REINFORCE++-baseline) against the float64 loop
over groups, on shuffled sparse group ids with a group of one and a zero-std group, at the CPU tests' size and at a
real one (16384 sequences in groups of 16)."""
import pytest
import torch
from _gpu import DEVICE, cuda_only, dry_subset, first_in_dry_run

from rlhf_fast.ops import group_advantages, reference, use_backend

pytestmark = pytest.mark.gpu
CASES = [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "group"), ("reinforce_pp_baseline", "group")]


def _batch(b, group):
    g = torch.Generator().manual_seed(b)
    ids = torch.arange(b) // group * 37 - 50  # sparse, negative ids ...
    ids[-1] = 10_000_000  # ... a group of one ...
    ids = ids[torch.randperm(b, generator=g)]  # ... in shuffled (non-contiguous) order
    s = torch.randn(b, generator=g, dtype=torch.float64)
    s[ids == ids[0]] = 1.0  # a zero-std group
    mask = torch.rand(b, 13, generator=g) < 0.7
    return s, ids, mask


@pytest.mark.parametrize("dtype", first_in_dry_run(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("size", first_in_dry_run((41, 6), pytest.param((16384, 16), marks=cuda_only)))
def test_group_advantages_match_fp64(size, dtype):
    s64, ids, mask = _batch(*size)
    s = s64.to(dtype)
    for mode, scale in dry_subset(CASES):
        for keep in dry_subset((False, True)):
            w = mask.sum(-1).double() if mode == "reinforce_pp_baseline" else None
            want, mean, std, count = reference.group_advantages(s.double(), ids, mode, scale=scale, weights=w,
                                                                keep_singletons=keep)
            with use_backend("triton"):
                got = group_advantages(s.to(DEVICE), ids.to(DEVICE), mode, scale=scale, mask=mask.to(DEVICE),
                                       keep_singletons=keep)
            tol = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, float(want.abs().max()))
            assert got.advantages.dtype == dtype and not got.advantages.isnan().any()
            err = float((got.advantages.double().cpu() - want).abs().max())
            assert err <= tol, (mode, scale, keep, err, tol)
            torch.testing.assert_close(got.group_mean.double().cpu(), mean, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(got.group_std.double().cpu(), std, atol=1e-4, rtol=1e-5)
            assert torch.equal(got.group_count.cpu(), count)
