"""In-process rollouts: paged KV cache, continuous batching, log-probs that match the trainer's recompute.

    engine = RolloutEngine(hf_model)                       # binds hf_model's own parameters
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0.7, n=4, seed=1))
    ref = teacher_forced_logprobs(hf_model, [prompts[o.prompt_index] for o in outs], outs)
"""
from rlhf_fast.rollout.allocator import BlockAllocator, OutOfBlocks
from rlhf_fast.rollout.engine import RolloutEngine
from rlhf_fast.rollout.scoring import teacher_forced_logprobs
from rlhf_fast.rollout.types import Completion, EngineStats, SamplingParams

__all__ = ["BlockAllocator", "Completion", "EngineStats", "OutOfBlocks", "RolloutEngine", "SamplingParams",
           "teacher_forced_logprobs"]
