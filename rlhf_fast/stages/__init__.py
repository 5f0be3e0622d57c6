"""The InstructGPT stages: supervised fine-tuning, the reward model, PPO, and the pipeline that chains them."""
