"""Constants shared by the loss kernels (Triton here, native C++ in csrc/value_loss.cpp) and their Python drivers.

A leaf module: plain ints and floats, no imports, so `triton-kernels/ppo_losses.py`, `rlhf_fast/ops/_losses_native.py`,
`rlhf_fast/ops/losses.py` and `rlhf_fast/ops/reference.py` all read it without importing each other.
"""

# |log ratio| is clamped to this before exp: exp(20) ~ 4.9e8 stays finite in fp16/bf16/fp32; the gradient is 0 where
# the clamp is active. Used by the KL estimators and the policy loss on every backend.
LOG_RATIO_CLAMP = 20.0

# Layout of the partial sums the loss kernels write per (row, chunk). *MEAN / *M2 are a chunk's mean and centred sum
# of squares, merged with Chan's formula. The native value-loss kernel writes the same V_* layout (csrc/value_loss.cpp).
P_LOSS, P_COUNT, P_CLIPPED, P_KL, P_RATIO, P_RMIN, P_RMAX, P_NONFINITE, P_K = range(9)
V_LOSS, V_COUNT, V_CLIPPED, V_VSUM, V_NONFINITE, V_RMEAN, V_RM2, V_EMEAN, V_EM2, V_K = range(10)
