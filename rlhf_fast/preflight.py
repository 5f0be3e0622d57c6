"""Checks a run makes before it trains anything: prompts that fit the model's positions, a reward model that reads
the policy's tokens, and options that would silently do nothing."""
from __future__ import annotations

import logging
from pathlib import Path

from rlhf_fast.config import ConfigError
from rlhf_fast.data import Examples, load_prompts
from rlhf_fast.truncation import context_length, fit_len

log = logging.getLogger(__name__)


def prompt_budget(max_len: int, model_or_config, max_new_tokens: int) -> int:
    """Prompt tokens a rollout may use: min(`max_len`, positions - `max_new_tokens`)."""
    return fit_len(max_len, context_length(model_or_config), max_new_tokens, key="ppo.max_new_tokens")


def load_rollout_prompts(path: str | Path, tokenizer, model_or_config, *, max_len: int, max_new_tokens: int,
                         overlong: str) -> Examples:
    """Prompts checked against the context at load time (`file:line` on error): each one, with
    `max_new_tokens` generated tokens after it, fits the model's positions (cut or dropped by `overlong`)."""
    return load_prompts(path, tokenizer, prompt_budget(max_len, model_or_config, max_new_tokens), overlong=overlong)


def check_same_tokenizer(policy_tok, policy: str, reward_model: str) -> None:
    """The reward model scores the policy's token ids as they are, so both must have the same tokenizer (checked
    when the RM directory has one saved; our stages always save it)."""
    from transformers import AutoTokenizer

    rm_dir = Path(reward_model)
    if not any((rm_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        log.warning("ppo: %s has no tokenizer saved, so it cannot be checked against the policy's", reward_model)
        return
    rm_tok = AutoTokenizer.from_pretrained(str(rm_dir))
    diffs = []
    if policy_tok.get_vocab() != rm_tok.get_vocab():
        diffs.append(f"vocabularies differ ({len(policy_tok)} vs {len(rm_tok)} tokens)")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(policy_tok, k) != getattr(rm_tok, k):
            diffs.append(f"{k} {getattr(policy_tok, k)} vs {getattr(rm_tok, k)}")
    if diffs:
        raise ConfigError(f"reward_model: {reward_model} has a different tokenizer from the policy {policy} "
                          f"({'; '.join(diffs)}); the RM would score the wrong tokens. Train the reward model from "
                          f"the SFT policy (or with its tokenizer)")


def warn_unused_ptx(ptx_data: str, ptx_coef: float) -> None:
    if ptx_data and ptx_coef == 0:
        log.warning("ppo.ptx_data is set (%s) but ptx_coef is 0, so the ptx texts are not used; "
                    "set ptx_coef > 0 to train on them", ptx_data)


def pipeline_prompts(sft_model: str, tokenizer_dir: str, arch_positions: int, files: list[str], *,
                     max_len: int, max_new_tokens: int, overlong: str) -> None:
    """Before SFT starts: load every prompt file PPO and the evaluation will read, against the context of the
    model SFT will train (`sft_model`, or the from-scratch architecture's `arch_positions`)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or sft_model)
    positions = context_length(AutoConfig.from_pretrained(sft_model)) if sft_model else arch_positions
    budget = fit_len(max_len, positions, max_new_tokens, key="ppo.max_new_tokens")
    for f in files:
        if f:
            load_prompts(f, tok, budget, overlong=overlong)
