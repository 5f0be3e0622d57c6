"""JSONL datasets for the three stages, tokenized up front, plus batching and padding helpers.

Formats (one JSON object per line; blank lines are allowed). A prompt is a string or `messages` (a list of
{"role", "content"} turns ending with a user turn, rendered by the tokenizer's chat template); `rlhf_fast.chat`
tokenizes it the same way in every stage.
  * SFT:  {"prompt", "response": str}  or  {"messages": [...]} (the last one the assistant's; `assistant_turns`
          "all" trains every assistant turn).
  * RM:   {"prompt", "completions": [str | assistant message] * K, "ranks": [int] * K} (K = 2..9, lower rank =
          better, equal ranks = a tie), or {"prompt", "chosen", "rejected"}; `prompt` may be `messages`.
  * PPO:  {"prompt"} or {"messages"};  PPO-ptx: {"text": str}.
A malformed line raises `DataError("file:line: what is wrong")`; nothing is skipped silently. A line longer than
`MAX_LINE_BYTES` (1 MiB) or not valid UTF-8 is such an error, found before anything is decoded or tokenized.
What is cut to fit a token budget is set per stage (`rlhf_fast.truncation`) and counted.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf_fast.chat import Codec, DataError, check_messages
from rlhf_fast.truncation import Examples, check_policy, fit_prompt, overlong_error, split_budget

__all__ = ["DataError", "Examples", "IGNORE_INDEX", "MAX_K", "MAX_LINE_BYTES", "PromptExample", "RankedExample",
           "SFTExample", "epoch_batches", "load_prompts", "load_rm", "load_sft", "load_texts", "pad_right", "read_jsonl",
           "sft_batch"]

log = logging.getLogger(__name__)
MAX_K = 9
MAX_LINE_BYTES = 1 << 20  # a longer JSONL line is an error (tokenizing a 50 MB line would take gigabytes)
IGNORE_INDEX = -100  # the label of a position without loss (prompt, padding); the ops' default ignore_index


class SFTExample(NamedTuple):
    input_ids: list[int]  # prompt + response (+ end of turn / eos)
    prompt_len: int  # loss on input_ids[prompt_len:] only (unless `spans` says otherwise)
    spans: tuple[tuple[int, int], ...] = ()  # multi-turn: the [start, end) ranges trained; () = [prompt_len, len)


class RankedExample(NamedTuple):
    prompt_ids: list[int]
    completions: list[list[int]]  # K completions (each ends with the end of turn / eos, unless cut)
    ranks: list[int]  # lower = better; equal = tie


class PromptExample(NamedTuple):
    text: str  # the prompt string, or the chat template's rendering of the messages
    ids: list[int]  # cut to the budget (`rlhf_fast.truncation`)
    raw: str | list[dict] | None = None  # the prompt as the line wrote it, uncut: the string or the messages list


def read_jsonl(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, dict]]:
    """Yield (`"file:line"`, object) for every non-blank line. A line over `max_line_bytes` or not UTF-8 is an
    error naming it; an over-long line is never read into memory whole."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        n = 0
        while raw := f.readline(max_line_bytes + 1):
            n += 1
            where = f"{path}:{n}"
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DataError(f"{where}: the line is over {max_line_bytes} bytes (the limit, "
                                f"rlhf_fast.data.MAX_LINE_BYTES); shorten or split it")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start} of the line is "
                                f"{raw[e.start:e.start + 1]!r})") from None
            if n == 1:
                line = line.removeprefix("\ufeff")
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
    """Prompt ids, with the tokenizer's own special tokens (e.g. BOS), never a doubled BOS."""
    return Codec(tokenizer).text_ids(text)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids followed by EOS (the policy must learn to stop)."""
    return Codec(tokenizer).response(text, chat=False)


class _Prompt(NamedTuple):
    ids: list[int]
    text: str
    msgs: list[dict] | None  # the chat's turns, when the prompt is `messages`


def _prompt(codec: Codec, obj: dict, where: str) -> _Prompt:
    """The line's prompt: `messages`, or `prompt` as a string or as messages (ending with a user turn)."""
    value = obj["messages"] if "messages" in obj else obj.get("prompt")
    if isinstance(value, list):
        msgs = check_messages(value, where, last="user")
        ids, text = codec.prompt(msgs, where)
        return _Prompt(ids, text, msgs)
    ids, text = codec.prompt(_str_field(obj, "prompt", where), where)
    return _Prompt(ids, text, None)


def _fit(codec: Codec, p: _Prompt, budget: int, where: str) -> list[int]:
    render = (lambda m: codec.prompt(m, where)[0]) if p.msgs is not None else None
    return fit_prompt(p.ids, budget, p.msgs, render)


def _finish(out: Examples, path, what: str) -> Examples:
    if not out:
        raise DataError(f"{path}: no {what}" + (f" ({out.counts.summary()})" if out.counts.touched else ""))
    out.counts.examples = len(out)
    (log.warning if out.counts.touched else log.info)("%s: %s", path, out.counts.summary())
    return out


def load_sft(path: str | Path, tokenizer, max_len: int, *, overlong: str = "truncate",
             assistant_turns: str = "last") -> Examples:
    """Tokenized SFT examples of at most `max_len` tokens (see `rlhf_fast.truncation` for what is cut)."""
    check_policy(overlong)
    codec, out = Codec(tokenizer), Examples()
    c = out.counts
    for where, obj in read_jsonl(path):
        if "messages" in obj and assistant_turns == "all":
            t = codec.sft_chat(obj["messages"], where, all_turns=True)
            if len(t.ids) > max_len:
                if overlong == "error":
                    raise overlong_error(where, "the conversation", len(t.ids), max_len, "sft.max_len")
                if overlong == "drop":
                    c.dropped += 1
                    continue
                c.responses_cut += 1  # multi-turn: the end is cut
            ids = t.ids[:max_len]
            spans = tuple((a, min(b, max_len)) for a, b in t.spans if a < max_len)
            out.append(SFTExample(ids, spans[0][0] if spans else len(ids), spans))
            continue
        if "messages" in obj:
            msgs = check_messages(obj["messages"], where, last="assistant")
            if len(msgs) < 2:
                raise DataError(f"{where}: 'messages' must be a list of at least 2 messages")
            p = _Prompt(*codec.prompt(msgs[:-1], where), msgs[:-1])
            r = codec.assistant(msgs[:-1], p.text, msgs[-1]["content"])[0]
        elif "prompt" in obj or "response" in obj:
            p = _prompt(codec, obj, where)
            r = codec.response(_str_field(obj, "response", where, allow_empty=True), chat=False)
        else:
            raise DataError(f"{where}: expected {{'prompt', 'response'}} or {{'messages'}}, got keys {sorted(obj)}")
        if len(p.ids) + len(r) > max_len:
            if overlong == "error":
                raise overlong_error(where, "prompt + response", len(p.ids) + len(r), max_len, "sft.max_len")
            if overlong == "drop":
                c.dropped += 1
                continue
            ids = _fit(codec, p, split_budget(len(p.ids), len(r), max_len), where)
            c.prompts_cut += len(ids) < len(p.ids)
            c.responses_cut += len(ids) + len(r) > max_len
            p = p._replace(ids=ids)
        out.append(SFTExample((p.ids + r)[:max_len], len(p.ids)))
    return _finish(out, path, "examples")


def _completion(codec: Codec, v, where: str, i: int, chat: bool, p: _Prompt) -> list[int]:
    if isinstance(v, dict):
        m = check_messages([v], f"{where}: completion {i}:", last="assistant")[0]
        if p.msgs is None:
            return codec.response(m["content"], chat=True)
        return codec.assistant(p.msgs, p.text, m["content"])[0]
    if not isinstance(v, str):
        raise DataError(f"{where}: completion {i} must be a string or an assistant message, got {type(v).__name__}")
    if chat:
        return codec.assistant(p.msgs, p.text, v)[0]
    return codec.response(v, chat=False)


def _merge_identical(cs: list[list[int]], ranks: list[int]) -> tuple[list[list[int]], list[int], int]:
    """Identical completions kept once, at the better rank; returns them and how many ordered pairs went."""
    keep: dict[tuple, int] = {}
    for i, comp in enumerate(cs):
        j = keep.setdefault(tuple(comp), i)
        if ranks[i] < ranks[j]:
            keep[tuple(comp)] = i
    idx = sorted(keep.values())

    def pairs(rs):
        return sum(1 for a in rs for b in rs if a < b)

    return [cs[i] for i in idx], [ranks[i] for i in idx], pairs(ranks) - pairs([ranks[i] for i in idx])


def load_rm(path: str | Path, tokenizer, max_len: int, *, overlong: str = "truncate") -> Examples:
    """Tokenized ranked examples; `chosen`/`rejected` lines become K = 2 rankings."""
    check_policy(overlong)
    codec, out = Codec(tokenizer), Examples()
    c = out.counts
    for where, obj in read_jsonl(path):
        p = _prompt(codec, obj, where)
        if "completions" in obj or "ranks" in obj:
            for key in ("completions", "ranks"):
                if key not in obj:
                    raise DataError(f"{where}: missing key {key!r} (has {sorted(obj)}; a ranked line needs "
                                    f"'completions' and 'ranks', a pair 'chosen' and 'rejected')")
            comps, ranks = obj["completions"], obj["ranks"]
            if not isinstance(comps, list):
                raise DataError(f"{where}: 'completions' must be a list of strings or assistant messages")
            if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
                raise DataError(f"{where}: 'ranks' must be a list of integers")
            if len(comps) != len(ranks):
                raise DataError(f"{where}: {len(comps)} completions but {len(ranks)} ranks")
            if not 2 <= len(comps) <= MAX_K:
                raise DataError(f"{where}: need 2..{MAX_K} completions, got {len(comps)}")
            if len(set(ranks)) == 1:
                raise DataError(f"{where}: all ranks are equal, so the line gives no comparison")
        elif "chosen" in obj or "rejected" in obj:
            comps = [obj["chosen"] if isinstance(obj.get("chosen"), dict) else
                     _str_field(obj, "chosen", where, allow_empty=True),
                     obj["rejected"] if isinstance(obj.get("rejected"), dict) else
                     _str_field(obj, "rejected", where, allow_empty=True)]
            ranks = [0, 1]
        else:
            raise DataError(f"{where}: expected 'completions' and 'ranks', or 'chosen' and 'rejected'; "
                            f"got keys {sorted(obj)}")
        cs = [_completion(codec, v, where, i, p.msgs is not None, p) for i, v in enumerate(comps)]
        longest = max(len(x) for x in cs)
        if len(p.ids) + longest > max_len:
            if overlong == "error":
                raise overlong_error(where, "prompt + longest completion", len(p.ids) + longest, max_len,
                                     "rm.max_len")
            if overlong == "drop":
                c.dropped += 1
                continue
            ids = _fit(codec, p, split_budget(len(p.ids), longest, max_len), where)
            c.prompts_cut += len(ids) < len(p.ids)
            c.responses_cut += sum(len(ids) + len(x) > max_len for x in cs)
            cs = [x[: max_len - len(ids)] for x in cs]
            p = p._replace(ids=ids)
            cs, ranks, gone = _merge_identical(cs, list(ranks))
            c.pairs_dropped += gone
            if len(set(ranks)) < 2:
                c.dropped += 1
                continue
        out.append(RankedExample(p.ids, cs, list(ranks)))
    return _finish(out, path, "examples")


def load_prompts(path: str | Path, tokenizer, max_len: int, *, overlong: str = "truncate") -> Examples:
    """PPO prompts of at most `max_len` tokens (chats lose their oldest turns, then the middle is cut)."""
    check_policy(overlong)
    codec, out = Codec(tokenizer), Examples()
    for where, obj in read_jsonl(path):
        p = _prompt(codec, obj, where)
        n = len(p.ids)
        out.full_lengths.append(n)
        if n > max_len:
            if overlong == "error":
                raise overlong_error(where, "the prompt", len(p.ids), max_len,
                                     "ppo.max_len, or the positions left by max_new_tokens")
            if overlong == "drop":
                out.counts.dropped += 1
                continue
            out.counts.prompts_cut += 1
            p = p._replace(ids=_fit(codec, p, max_len, where))
        out.append(PromptExample(p.text, p.ids, p.msgs if p.msgs is not None else p.text))
    return _finish(out, path, "prompts")


def load_texts(path: str | Path, tokenizer, max_len: int) -> Examples:
    """PPO-ptx texts, each keeping its first `max_len` tokens."""
    codec, out = Codec(tokenizer), Examples()
    for where, obj in read_jsonl(path):
        ids = codec.text_ids(_str_field(obj, "text", where))
        if len(ids) < 2:
            raise DataError(f"{where}: 'text' is a single token, nothing to predict")
        out.counts.responses_cut += len(ids) > max_len
        out.append(ids[:max_len])
    return _finish(out, path, "texts")


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


def sft_batch(examples: list[SFTExample], pad_id: int,
              ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids (B, T)` and next-token `labels (B, T-1)`: labels[b, t] = input_ids[b, t+1] on response tokens,
    `ignore_index` on prompt tokens and padding."""
    ids, lengths = pad_right([e.input_ids for e in examples], pad_id)
    labels = ids[:, 1:].clone()  # (B, T-1)
    pos = torch.arange(1, ids.shape[1]).unsqueeze(0)  # position of each label token, (1, T-1)
    prompt_len = torch.tensor([e.prompt_len for e in examples]).unsqueeze(1)
    keep = (pos >= prompt_len) & (pos < lengths.unsqueeze(1))
    for b, e in enumerate(examples):
        if e.spans:  # multi-turn: only the trained assistant turns
            row = torch.zeros(ids.shape[1], dtype=torch.bool)
            for a, z in e.spans:
                row[a:z] = True
            keep[b] = row[1:]
    labels[~keep] = ignore_index
    return ids, labels
