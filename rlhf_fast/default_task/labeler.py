"""The synthetic instruction-following task and its programmatic labeler (the stand-in for human labelers).

A prompt asks for one operation on a short list of letters: `user : reverse c a e assistant :`. The right answer
is the list transformed (`e a c`). Demonstrations are imperfect on purpose, as human ones are: some are padded with
conversational filler (`sure , here is the answer : e a c . hope this helps`) and some are simply wrong. The
labeler prefers, in order: a correct answer, then a shorter response. So PPO has something to learn beyond imitation:
drop the filler and stop making mistakes.
"""
from __future__ import annotations

import random
from typing import NamedTuple

OPS = ("reverse", "sort", "copy")
ITEMS = tuple("abcdefghij")
PREFIXES = ("sure , here is the answer :", "ok , the result is :", "let me think . the answer is :")
SUFFIXES = (". hope this helps", ". let me know if you need more", ". done")
FILLER = frozenset(w for p in PREFIXES + SUFFIXES for w in p.split())
ROLE_WORDS = ("user", "assistant", ":")
VOCAB = tuple(dict.fromkeys(OPS + ITEMS + ROLE_WORDS + tuple(sorted(FILLER))))


class Problem(NamedTuple):
    op: str
    items: tuple[str, ...]


class Judgement(NamedTuple):
    correct: bool
    n_words: int

    def key(self) -> tuple[int, int]:
        """Larger is better: correctness first, then brevity."""
        return (int(self.correct), -self.n_words)


def answer(p: Problem) -> list[str]:
    if p.op == "reverse":
        return list(reversed(p.items))
    if p.op == "sort":
        return sorted(p.items)
    return list(p.items)


def prompt_text(p: Problem) -> str:
    return f"user : {p.op} {' '.join(p.items)} assistant :"


def parse_prompt(text: str) -> Problem:
    words = text.split()
    if len(words) < 5 or words[:2] != ["user", ":"] or words[-2:] != ["assistant", ":"] or words[2] not in OPS:
        raise ValueError(f"not a prompt of the default task: {text!r}")
    items = tuple(words[3:-2])
    if not items or any(w not in ITEMS for w in items):
        raise ValueError(f"not a prompt of the default task: {text!r}")
    return Problem(words[2], items)


def random_problem(rng: random.Random, min_items: int, max_items: int) -> Problem:
    n = rng.randint(min_items, max_items)
    return Problem(rng.choice(OPS), tuple(rng.choice(ITEMS) for _ in range(n)))


def wrong_answer(rng: random.Random, p: Problem) -> list[str]:
    """A plausible mistake: one item changed, two neighbours swapped, or one item dropped."""
    right = answer(p)
    for _ in range(20):
        out = list(right)
        kind = rng.randrange(3)
        i = rng.randrange(len(out))
        if kind == 0:
            out[i] = rng.choice([x for x in ITEMS if x != out[i]])
        elif kind == 1 and len(out) > 1:
            j = i + 1 if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif len(out) > 1:
            del out[i]
        if out != right:
            return out
    return right[:-1] + [x for x in ITEMS if x != right[-1]][:1]


def dress(rng: random.Random, words: list[str], verbose: bool) -> str:
    """The answer as a response, padded with filler (a prefix, a suffix or both) when `verbose`."""
    body = " ".join(words)
    if not verbose:
        return body
    style = rng.randrange(3)
    pre = rng.choice(PREFIXES) + " " if style != 1 else ""
    post = " " + rng.choice(SUFFIXES) if style != 0 else ""
    return pre + body + post


def demonstration(rng: random.Random, p: Problem, p_verbose: float, p_wrong: float) -> str:
    words = wrong_answer(rng, p) if rng.random() < p_wrong else answer(p)
    return dress(rng, words, rng.random() < p_verbose)


def candidate(rng: random.Random, p: Problem) -> str:
    """One completion to be ranked: a mix of right/wrong, plain/padded answers, and a few broken ones."""
    r = rng.random()
    if r < 0.08:  # broken: truncated or rambling
        words = answer(p)
        return " ".join(words[: rng.randrange(len(words))]) if rng.random() < 0.5 else dress(
            rng, words + words, True)
    return demonstration(rng, p, p_verbose=0.5, p_wrong=0.4)


def judge(prompt: str, response: str) -> Judgement:
    """Correct iff the response, with filler words removed, is exactly the right answer."""
    words = response.split()
    content = [w for w in words if w not in FILLER]
    return Judgement(content == answer(parse_prompt(prompt)), len(words))


def rank(prompt: str, completions: list[str]) -> list[int]:
    """Dense ranks, 0 = best; equally good completions tie."""
    keys = [judge(prompt, c).key() for c in completions]
    order = sorted(set(keys), reverse=True)
    return [order.index(k) for k in keys]


def compare(prompt: str, a: str, b: str) -> float:
    """1 if the labeler prefers `a` over `b`, 0.5 on a tie, else 0."""
    ka, kb = judge(prompt, a).key(), judge(prompt, b).key()
    return 1.0 if ka > kb else 0.5 if ka == kb else 0.0
