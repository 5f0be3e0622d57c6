"""`python -m rlhf_fast ...`, and under torchrun: `torchrun --nproc_per_node N -m rlhf_fast sft|rm|ppo|pipeline ...`
runs the same command on every rank (see `rlhf_fast.distributed`)."""
import sys

from rlhf_fast.cli import main

sys.exit(main())
