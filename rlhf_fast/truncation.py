"""Truncation: what each stage cuts when an example is longer than its token budget, and the count of what it cut.

Each stage's `overlong` key picks the policy: `truncate` (the default) cuts as below, `drop` leaves the example out
(counted), `error` stops at load time with `file:line`. Nothing is cut silently: the loaders count every cut and
drop and log one line per file.

* **Prompts** (all stages) keep their start (BOS, the system turn, the template's headers) and their end (the
  latest user turn and the generation prompt). A chat loses its oldest turns first (a leading system turn is
  kept); what is still too long, or a plain-string prompt, loses its middle.
* **SFT**: the prompt is cut first, down to what leaves the response whole but never below half of `max_len`;
  then the response's end is cut (it then has no end token, and is counted as such).
* **RM**: the same, against the longest completion; completions that truncation made identical are merged into
  the better-ranked one, and the pairs that compared them are dropped and counted.
* **PPO**: prompt + `max_new_tokens` must fit the model's positions, so prompts are cut to
  min(`max_len`, positions - `max_new_tokens`).
* **PPO-ptx** texts keep their first `ptx_max_len` tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from rlhf_fast.chat import DataError
from rlhf_fast.config import ConfigError

POLICIES = ("truncate", "drop", "error")


@dataclasses.dataclass
class Counts:
    """What a loader cut or dropped in one file."""

    examples: int = 0  # kept
    prompts_cut: int = 0
    responses_cut: int = 0  # lost their end token
    dropped: int = 0  # overlong=drop, or an RM line left with nothing to compare
    pairs_dropped: int = 0  # RM pairs whose two completions truncation made identical

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        for k, what in (("prompts_cut", "prompts cut"), ("responses_cut", "responses cut (no end token left)"),
                        ("dropped", "dropped"), ("pairs_dropped", "pairs dropped (made identical by the cut)")):
            if getattr(self, k):
                parts.append(f"{getattr(self, k)} {what}")
        return ", ".join(parts)

    @property
    def touched(self) -> bool:
        return bool(self.prompts_cut or self.responses_cut or self.dropped or self.pairs_dropped)


class Examples(list):
    """A loader's examples, with the `Counts` of what truncation did to the file (and, from `load_prompts`, every
    prompt's length before any cut or drop, `full_lengths`)."""

    def __init__(self, items=(), counts: Counts | None = None):
        super().__init__(items)
        self.counts = counts or Counts()
        self.full_lengths: list[int] = []


WARN_CUT_FRACTION = 0.05  # PPO prompts: warn when more than this fraction of a file's prompts is cut


def warn_prompts_cut(prompts: Examples, path, *, budget: int, max_len: int, positions: int | None,
                     max_new_tokens: int, log) -> bool:
    """A warning with the numbers when more than `WARN_CUT_FRACTION` of `prompts` (from `load_prompts` with
    `budget` = min(`max_len`, `positions` - `max_new_tokens`)) were cut; returns whether it warned."""
    n, cut = len(prompts) + prompts.counts.dropped, prompts.counts.prompts_cut + prompts.counts.dropped
    if not n or cut <= WARN_CUT_FRACTION * n:
        return False
    lengths = sorted(prompts.full_lengths) or [0]
    if positions is not None and positions - max_new_tokens < max_len:
        why = (f"the model's {positions} positions less sampling.max_new_tokens={max_new_tokens} leave {budget}; "
               f"lower max_new_tokens to keep more of each prompt")
    else:
        why = f"ppo.max_len={max_len}; raise it to keep more of each prompt"
    what = "cut" if not prompts.counts.dropped else "cut or dropped"
    log.warning("ppo: %d of %d prompts in %s (%.0f%%) were %s to fit %d tokens (prompts are %d tokens at the "
                "median, %d at most): %s", cut, n, path, 100 * cut / n, what, budget, lengths[len(lengths) // 2],
                lengths[-1], why)
    return True


def middle_cut(ids: list[int], budget: int) -> list[int]:
    """The first ceil(budget/2) and the last floor(budget/2) ids."""
    if len(ids) <= budget:
        return ids
    head = (budget + 1) // 2
    return ids[:head] + (ids[len(ids) - (budget - head):] if budget > head else [])


def fit_prompt(ids: list[int], budget: int, msgs: list[dict] | None = None,
               render: Callable[[list[dict]], list[int]] | None = None) -> list[int]:
    """`ids` cut to at most `budget` tokens: for a chat (`msgs` and `render(msgs) -> ids`), drop the oldest turns
    (keeping leading system turns and starting the rest at a user turn), then cut the middle."""
    if len(ids) <= budget:
        return ids
    if msgs is not None and render is not None:
        n_sys = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
        starts = [j for j in range(n_sys + 1, len(msgs)) if msgs[j]["role"] == "user"]
        for j in starts:
            ids = render(msgs[:n_sys] + msgs[j:])
            if len(ids) <= budget:
                return ids
    return middle_cut(ids, budget)


def check_policy(overlong: str) -> None:
    if overlong not in POLICIES:
        raise ConfigError(f"overlong: must be one of {', '.join(POLICIES)}, got {overlong!r}")


def overlong_error(where: str, what: str, n: int, budget: int, key: str) -> DataError:
    return DataError(f"{where}: {what} is {n} tokens, over the {budget} that fit ({key}; set overlong=truncate "
                     f"or overlong=drop to load it)")


def split_budget(prompt_len: int, longest_response: int, max_len: int) -> int:
    """Tokens the prompt keeps when prompt + response exceeds `max_len`: enough to leave the response whole,
    but never fewer than half of `max_len` (or the whole prompt, when it is shorter)."""
    return max(max_len - longest_response, min(prompt_len, max_len // 2), 1)


def context_length(model_or_config) -> int | None:
    """A HF causal LM's positions (`max_position_embeddings`, GPT-2's `n_positions`), or None if unbounded."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def fit_len(max_len: int, positions: int | None, reserve: int = 0, *, key: str = "max_len") -> int:
    """min(`max_len`, `positions` - `reserve`): the budget that fits the model; an error if nothing fits."""
    if positions is None:
        return max_len
    room = positions - reserve
    if room < 1:
        raise ConfigError(f"{key}: the model has {positions} positions, and max_new_tokens={reserve} leaves no room "
                         f"for a prompt")
    return min(max_len, room)
