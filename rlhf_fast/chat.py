"""One tokenization of prompts and responses for all three stages: plain strings or chat `messages`.

* A prompt is a string, tokenized with the tokenizer's own special tokens (e.g. BOS; a BOS the text already starts
  with is not added twice), or `messages`: {"role", "content"} turns ending with a user turn, rendered by the chat
  template with its generation prompt and tokenized without adding special tokens (the template writes its own
  BOS, as `apply_chat_template(tokenize=True)` does). SFT, RM and PPO all go through `Codec.prompt`, so a prompt's
  ids are the same in every stage.
* An assistant turn ends the way the template ends a turn (e.g. `<|im_end|>`); a plain-string response, or a
  template that writes no end marker, ends with the eos token. `Codec.stop_ids` holds both, so generation stops
  where training taught the policy to stop.
"""
from __future__ import annotations

from typing import NamedTuple


class DataError(ValueError):
    """A malformed data file; the message starts with `file:line:`."""


class SFTTokens(NamedTuple):
    ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) ranges of `ids` that are trained (assistant turns)


_PROBE = "rlhf-fast-probe-7f3a"


def check_messages(msgs, where: str, *, last: str) -> list[dict]:
    """`msgs` as a list of {"role", "content"} string dicts whose last role is `last` ("user" or "assistant")."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if msgs[-1]["role"] != last:
        raise DataError(f"{where}: the last message must be the {last}'s, got role {msgs[-1]['role']!r}")
    return msgs


class Codec:
    """Tokenizes prompts, responses and chats the same way in every stage, for one tokenizer."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; responses need one to end")
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.turn_end = self._turn_end() if self.has_template else ""  # e.g. "<|im_end|>"; "" if none

    def _turn_end(self) -> str:
        """The text the template writes after an assistant message's content (surrounding whitespace stripped)."""
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            full = self.tok.apply_chat_template(msgs, tokenize=False)
        except Exception:  # a template that rejects the probe conversation: fall back to eos
            return ""
        i = full.rfind(_PROBE)
        return full[i + len(_PROBE):].strip() if i >= 0 else ""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a generated response: eos, and the template's end-of-turn token."""
        end = self.encode(self.turn_end) if self.turn_end else []
        return (self.eos,) + ((end[-1],) if len(end) == 1 and end[-1] != self.eos else ())

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        """A plain string with the tokenizer's special tokens, without a doubled BOS."""
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        if self.bos is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos:
            ids = ids[1:]
        return ids

    def render(self, msgs: list[dict], where: str) -> str:
        """`msgs` through the chat template, with the generation prompt."""
        if not self.has_template:
            raise DataError(f"{where}: 'messages' needs a tokenizer with a chat template, and this one has none")
        return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def prompt(self, value, where: str) -> tuple[list[int], str]:
        """(ids, text) of a prompt: a string, or messages ending with a user turn."""
        if isinstance(value, str):
            return self.text_ids(value), value
        text = self.render(check_messages(value, where, last="user"), where)
        return self.encode(text), text

    def response(self, content: str, *, chat: bool) -> list[int]:
        """A response's ids: it ends with the template's end of turn in a chat, else with eos."""
        if chat and self.turn_end:
            return self.encode(content + self.turn_end)
        return self.encode(content) + [self.eos]

    def assistant(self, msgs: list[dict], prompt_text: str, content: str) -> tuple[list[int], str]:
        """(ids, text) of an assistant turn `content` after `msgs` (rendered as `prompt_text`), cut from the
        template's own rendering of the conversation, so the turn ends exactly as the template ends it."""
        full = self.tok.apply_chat_template(msgs + [{"role": "assistant", "content": content}], tokenize=False)
        if not full.startswith(prompt_text):  # a template that renders history differently: content + end
            return self.response(content, chat=True), content + self.turn_end
        seg = full[len(prompt_text):].rstrip()
        if self.turn_end and seg.endswith(self.turn_end):
            return self.encode(seg), seg
        return self.encode(seg) + [self.eos], seg

    def sft_chat(self, msgs: list[dict], where: str, *, all_turns: bool) -> SFTTokens:
        """A chat ending with an assistant turn: the last (or every) assistant turn trained, the rest masked.
        With one trained turn the prompt is tokenized in one piece, exactly as `prompt` does."""
        msgs = check_messages(msgs, where, last="assistant")
        if len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least 2 messages")
        targets = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i > 0] if all_turns else [len(msgs) - 1]
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        done = ""
        for i in targets:
            p = self.render(msgs[:i], where)
            if not p.startswith(done):
                raise DataError(f"{where}: the chat template renders messages[:{i}] differently from the earlier "
                                f"turns, so every assistant turn cannot be trained; use sft.assistant_turns=last")
            ids += self.encode(p[len(done):])
            r, seg = self.assistant(msgs[:i], p, msgs[i]["content"])
            spans.append((len(ids), len(ids) + len(r)))
            ids += r
            done = p + seg
        return SFTTokens(ids, spans)
