"""What goes into and comes out of the rollout engine: prompts (checked), sampling parameters, completions,
statistics."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample each completion. `temperature == 0` is greedy decoding."""

    max_new_tokens: int = 64  # tokens generated per completion at most
    temperature: float = 1.0  # logits / temperature before softmax; 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = all
    n: int = 1  # completions per prompt (they share the prompt's KV blocks)
    seed: int | None = None  # per-request seed; None draws one from torch's global generator
    stop_token_ids: tuple[int, ...] = ()  # generation stops after emitting one of these (e.g. EOS)
    logprobs: str = "sampled"  # "sampled": under the distribution sampled from (top-k/top-p applied); "full"

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.logprobs not in ("sampled", "full"):
            raise ValueError(f"logprobs must be 'sampled' or 'full', got {self.logprobs!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def truncated(self, vocab: int) -> bool:
        """Whether top-k / top-p cut the distribution sampled from (never under greedy decoding)."""
        return not self.greedy and (0 < self.top_k < vocab or self.top_p < 1.0)

    @property
    def logprob_temperature(self) -> float:
        """The temperature the returned log-probs are taken at (1 under greedy decoding)."""
        return 1.0 if self.greedy else float(self.temperature)


class Completion(NamedTuple):
    """One sampled continuation of `prompts[prompt_index]`.

    token_ids: the generated tokens (prompt excluded), length L.
    logprobs: (L,) float32, the log-prob of each sampled token under the distribution it was sampled from:
        softmax(logits / temperature) cut by top-k / top-p and renormalised (`ops.token_logprobs(..., top_k, top_p)`;
        temperature 1 when greedy). With `SamplingParams(logprobs="full")`: log-softmax over the whole vocabulary.
    finish_reason: "stop" (a stop token was emitted, and is included) or "length" (max_new_tokens reached).
    support_threshold: (L,) float32, the threshold of the support each token was sampled from, in units of
        logits / temperature (`ops.support_threshold`; -inf where top-k / top-p cut nothing): the trainer replays it
        with `ops.token_logprobs(..., support="replay", support_threshold=...)`.
    routes: (M, prompt_len + L - 1, k) int16 for a mixture-of-experts model (None for a dense one): the experts
        each input token the rollout fed (the prompt, then every generated token but the last) was routed to in
        each of the M MoE layers (`moe.RoutingRecord`), -1 where a layer skipped the row (a prefill's last layer
        computes only the rows that sample); replayed by the trainer (`ppo.moe_routing: replay`).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: str
    support_threshold: torch.Tensor | None = None
    routes: torch.Tensor | None = None


@dataclasses.dataclass
class EngineStats:
    """Counters of the last `generate` call (KV figures are over the whole call)."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    prefill_steps: int = 0
    preemptions: int = 0
    num_blocks: int = 0  # blocks in the KV pool
    peak_blocks_used: int = 0
    bytes_per_block: int = 0  # K and V of every layer for block_size tokens
    compilations: int = 0  # decode-step graphs compiled during the call (RolloutEngine(compile=True))
    compile_seconds: float = 0.0  # wall time of the steps that compiled (included in `seconds`)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def peak_kv_bytes(self) -> int:
        return self.peak_blocks_used * self.bytes_per_block


def check_prompts(prompts, vocab_size: int, max_context: int, extra: int = 0,
                  name: str = "prompts") -> list[list[int]]:
    """Validate `prompts` (a list of non-empty token-id lists); `extra` tokens must still fit in the context."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) for t in p):
            raise TypeError(f"{name}[{i}] must be a list of ints, got {type(p).__name__}")
        if not p:
            raise ValueError(f"{name}[{i}] is empty: each needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}[{i}] has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if len(p) + extra > max_context:
            raise ValueError(f"{name}[{i}] has {len(p)} tokens; with {extra} more it exceeds the model's context "
                             f"of {max_context} tokens")
        out.append(list(p))
    return out
