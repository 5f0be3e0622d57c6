"""JSONL datasets for the three stages, tokenized up front, plus batching and padding helpers.

Formats (one JSON object per line; blank lines are allowed):
  * SFT:  {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]} (last one the assistant's,
          rendered with the tokenizer's chat template).
  * RM:   {"prompt": str, "completions": [str] * K, "ranks": [int] * K} (K = 2..9, lower rank = better, equal
          ranks = a tie), or {"prompt": str, "chosen": str, "rejected": str}.
  * PPO:  {"prompt": str};  PPO-ptx: {"text": str}.
A malformed line raises `DataError("file:line: what is wrong")`; nothing is skipped silently.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

MAX_K = 9


class DataError(ValueError):
    """A malformed data file; the message starts with `file:line:`."""


class SFTExample(NamedTuple):
    input_ids: list[int]  # prompt + response (+ eos)
    prompt_len: int  # loss on input_ids[prompt_len:] only


class RankedExample(NamedTuple):
    prompt_ids: list[int]
    completions: list[list[int]]  # K completions (each ends with eos)
    ranks: list[int]  # lower = better; equal = tie


class PromptExample(NamedTuple):
    text: str
    ids: list[int]


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (`"file:line"`, object) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _str_field(obj: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing key {key!r} (has {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return v


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids, with the tokenizer's own special tokens (e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids followed by EOS (the policy must learn to stop)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; responses need one to end")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def _messages(obj: dict, where: str, tokenizer) -> tuple[list[int], list[int]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least 2 messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's, got role {msgs[-1]['role']!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' needs a tokenizer with a chat template, and this one has none")
    prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return prompt_ids, encode_response(tokenizer, msgs[-1]["content"])


def load_sft(path: str | Path, tokenizer, max_len: int) -> list[SFTExample]:
    """Tokenized SFT examples, truncated to `max_len` tokens (the response's end is cut first)."""
    out = []
    for where, obj in read_jsonl(path):
        if "messages" in obj:
            p, r = _messages(obj, where, tokenizer)
        elif "prompt" in obj or "response" in obj:
            p = encode_prompt(tokenizer, _str_field(obj, "prompt", where))
            r = encode_response(tokenizer, _str_field(obj, "response", where, allow_empty=True))
        else:
            raise DataError(f"{where}: expected {{'prompt', 'response'}} or {{'messages'}}, got keys {sorted(obj)}")
        if len(p) >= max_len:
            raise DataError(f"{where}: the prompt is {len(p)} tokens, leaving no room for the response "
                            f"(max_len={max_len})")
        out.append(SFTExample((p + r)[:max_len], len(p)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def load_rm(path: str | Path, tokenizer, max_len: int) -> list[RankedExample]:
    """Tokenized ranked examples; `chosen`/`rejected` lines become K = 2 rankings."""
    out = []
    for where, obj in read_jsonl(path):
        prompt = _str_field(obj, "prompt", where)
        if "completions" in obj or "ranks" in obj:
            comps, ranks = obj.get("completions"), obj.get("ranks")
            if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
                raise DataError(f"{where}: 'completions' must be a list of strings")
            if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
                raise DataError(f"{where}: 'ranks' must be a list of integers")
            if len(comps) != len(ranks):
                raise DataError(f"{where}: {len(comps)} completions but {len(ranks)} ranks")
            if not 2 <= len(comps) <= MAX_K:
                raise DataError(f"{where}: need 2..{MAX_K} completions, got {len(comps)}")
            if len(set(ranks)) == 1:
                raise DataError(f"{where}: all ranks are equal, so the line gives no comparison")
        elif "chosen" in obj or "rejected" in obj:
            comps = [_str_field(obj, "chosen", where, allow_empty=True),
                     _str_field(obj, "rejected", where, allow_empty=True)]
            ranks = [0, 1]
        else:
            raise DataError(f"{where}: expected 'completions' and 'ranks', or 'chosen' and 'rejected'; "
                            f"got keys {sorted(obj)}")
        p = encode_prompt(tokenizer, prompt)
        if len(p) >= max_len:
            raise DataError(f"{where}: the prompt is {len(p)} tokens (max_len={max_len})")
        cs = [encode_response(tokenizer, c)[: max_len - len(p)] for c in comps]
        out.append(RankedExample(p, cs, list(ranks)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def load_prompts(path: str | Path, tokenizer, max_len: int) -> list[PromptExample]:
    """PPO prompts, left-truncated to `max_len` tokens."""
    out = [PromptExample(t, encode_prompt(tokenizer, t)[-max_len:])
           for t in (_str_field(obj, "prompt", where) for where, obj in read_jsonl(path))]
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def load_texts(path: str | Path, tokenizer, max_len: int) -> list[list[int]]:
    """PPO-ptx texts, each truncated to `max_len` tokens."""
    out = []
    for where, obj in read_jsonl(path):
        ids = encode_prompt(tokenizer, _str_field(obj, "text", where))[:max_len]
        if len(ids) < 2:
            raise DataError(f"{where}: 'text' is a single token, nothing to predict")
        out.append(ids)
    if not out:
        raise DataError(f"{path}: no texts")
    return out


# --- batching ----------------------------------------------------------------------------------------------------


def epoch_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int,
                  bucket_size: int = 1) -> list[list[int]]:
    """Index batches for one epoch: a seeded shuffle, then length bucketing inside windows of `bucket_size`
    batches (less padding), the batches of each window shuffled again. Same arguments -> same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * bucket_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        if bucket_size > 1:
            chunk.sort(key=lambda i: lengths[i])
        group = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        perm = torch.randperm(len(group), generator=g).tolist()
        batches.extend(group[p] for p in perm)
    return batches


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids `(B, T)` int64 and lengths `(B,)` int64. With right padding a causal model's real tokens
    never see a pad, so no attention mask is needed."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


def sft_batch(examples: list[SFTExample], pad_id: int, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids (B, T)` and next-token `labels (B, T-1)`: labels[b, t] = input_ids[b, t+1] on response tokens,
    `ignore_index` on prompt tokens and padding."""
    ids, lengths = pad_right([e.input_ids for e in examples], pad_id)
    labels = ids[:, 1:].clone()  # (B, T-1)
    pos = torch.arange(1, ids.shape[1]).unsqueeze(0)  # position of each label token, (1, T-1)
    prompt_len = torch.tensor([e.prompt_len for e in examples]).unsqueeze(1)
    keep = (pos >= prompt_len) & (pos < lengths.unsqueeze(1))
    labels[~keep] = ignore_index
    return ids, labels
