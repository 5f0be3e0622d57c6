"""Reward functions for the `ppo.reward_fn` tests (imported by name, "module:function")."""
import math


def short_is_good(prompts, completions):
    """A checkable reward: 1 for an empty completion, less the longer it gets."""
    assert len(prompts) == len(completions)
    return [1.0 / (1 + len(c.split())) for c in completions]


CALLS = []


def raises_on_the_third(prompts, completions):
    """Fails on a batch; called again one sample at a time, fails on the third sample."""
    if len(completions) == 1:
        CALLS.append(completions[0])
        if len(CALLS) == 3:
            raise KeyError("no answer key")
        return [0.0]
    CALLS.clear()
    raise KeyError("no answer key")


def nan_on_the_second(prompts, completions):
    return [math.nan if i == 1 else 0.5 for i in range(len(completions))]


def wrong_count(prompts, completions):
    return [1.0]
