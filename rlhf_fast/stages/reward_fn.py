"""Verifiable rewards for the PPO stage: `ppo.reward_fn: "module:function"`, called in batches.

    def my_reward(prompts: list[str | list[dict]], completions: list[str]) -> list[float]: ...

* `prompts[i]` is the prompt as the JSONL line wrote it: the `prompt` string, or the `messages` list of
  {"role", "content"} dicts (a copy; the chat template's rendering and its special tokens are not in it), whole
  even when truncation cut its tokens. Completions of one prompt (`sampling.n`) each get it once.
* `completions[i]` is the generated text, decoded without special tokens (no `<|im_end|>`, no eos).
* It returns one float per pair (a list, tuple or 1-D tensor/array of that length); its scores replace the reward
  model's, or are added to them when `ppo.reward_model` is also set.

`module` is imported as Python imports it, and from the current directory too (as `python -m` and pytest do), so
`--set reward_fn=myreward:exact` finds `./myreward.py` without PYTHONPATH. A function that raises, returns the
wrong number of scores or a non-finite one stops the run with a `RewardFnError` naming the sample (index, prompt
and completion), before the update that would use it; the CLI prints it as one line.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable

import torch

from rlhf_fast.config import ConfigError

RewardFn = Callable[[list, list[str]], object]


class RewardFnError(RuntimeError):
    pass


def _import(mod_name: str):
    """`mod_name` imported; if Python cannot find its top-level package, from the current directory too."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        top = mod_name.partition(".")[0]
        cwd = os.getcwd()
        if e.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)  # last: a file here never shadows an installed package
        importlib.invalidate_caches()
        return importlib.import_module(mod_name)


def load(spec: str) -> RewardFn:
    """The callable named by "package.module:function" (a ConfigError naming `ppo.reward_fn` otherwise)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"ppo.reward_fn must look like 'module:function', got {spec!r}")
    try:
        mod = _import(mod_name)
    except ImportError as e:
        raise ConfigError(f"ppo.reward_fn: cannot import module {mod_name!r}: {e} (looked in the current directory "
                          f"{os.getcwd()} and on sys.path)") from e
    fn = mod
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"ppo.reward_fn: module {mod_name!r} ({getattr(mod, '__file__', '?')}) has no "
                              f"attribute {fn_name!r}")
    if not callable(fn):
        raise ConfigError(f"ppo.reward_fn: {spec!r} is not callable")
    return fn


def as_written(prompt):
    """What `reward_fn` gets for a prompt: the string, or a copy of the messages (the caller cannot change ours)."""
    return [dict(m) for m in prompt] if isinstance(prompt, list) else prompt


def _describe(i: int, prompt, completion: str) -> str:
    shown = prompt if isinstance(prompt, str) else (prompt[-1].get("content", "") if prompt else "")
    what = "prompt" if isinstance(prompt, str) else f"prompt's last message of {len(prompt)}"
    return f"sample {i} ({what} {shown[:200]!r}, completion {completion[:200]!r})"


def score(fn: RewardFn, name: str, prompts: list, completions: list[str]) -> torch.Tensor:
    """(N,) float32 scores of `fn` on the N (prompt, completion) pairs, checked (see the module docstring)."""
    try:
        out = fn([as_written(p) for p in prompts], list(completions))
    except Exception as batch_error:  # noqa: BLE001 - find the sample, then fail loudly
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                fn([as_written(p)], [c])
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
