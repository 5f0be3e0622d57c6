"""Verifiable rewards for the PPO stage: `ppo.reward_fn: "module:function"`, called in batches.

The function takes `(prompts: list[str], completions: list[str])` and returns one float per pair (a list, tuple or
1-D tensor/array of that length); its scores replace the reward model's, or are added to them when
`ppo.reward_model` is also set. A function that raises, returns the wrong number of scores or a non-finite one
stops the run with an error naming the sample (index, prompt and completion), before the update that would use it.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

RewardFn = Callable[[list[str], list[str]], object]


class RewardFnError(RuntimeError):
    pass


def load(spec: str) -> RewardFn:
    """The callable named by "package.module:function" (an error naming `ppo.reward_fn` otherwise)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"ppo.reward_fn must look like 'module:function', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"ppo.reward_fn: cannot import module {mod_name!r}: {e}") from e
    fn = mod
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"ppo.reward_fn: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"ppo.reward_fn: {spec!r} is not callable")
    return fn


def _describe(i: int, prompt: str, completion: str) -> str:
    return f"sample {i} (prompt {prompt[:200]!r}, completion {completion[:200]!r})"


def score(fn: RewardFn, name: str, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """(N,) float32 scores of `fn` on the N (prompt, completion) pairs, checked (see the module docstring)."""
    try:
        out = fn(list(prompts), list(completions))
    except Exception as batch_error:  # noqa: BLE001 - find the sample, then fail loudly
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                fn([p], [c])
            except Exception as e:  # noqa: BLE001
                raise RewardFnError(f"ppo.reward_fn {name} raised {type(e).__name__}: {e} on "
                                    f"{_describe(i, p, c)}") from e
        raise RewardFnError(f"ppo.reward_fn {name} raised {type(batch_error).__name__}: {batch_error} on a batch "
                            f"of {len(prompts)} samples (each one alone scores)") from batch_error
    try:
        vals = [float(v) for v in (out.tolist() if hasattr(out, "tolist") else out)]
    except (TypeError, ValueError) as e:
        raise RewardFnError(f"ppo.reward_fn {name} must return one float per sample, got {type(out).__name__}: "
                            f"{e}") from None
    if len(vals) != len(prompts):
        raise RewardFnError(f"ppo.reward_fn {name} returned {len(vals)} scores for {len(prompts)} samples")
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            raise RewardFnError(f"ppo.reward_fn {name} returned {v} for {_describe(i, prompts[i], completions[i])}")
    return torch.tensor(vals, dtype=torch.float32)
