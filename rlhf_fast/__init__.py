"""rlhf_fast: kernel-accelerated PPO for RLHF (InstructGPT's SFT -> reward model -> PPO)."""
__version__ = "0.1.0"
