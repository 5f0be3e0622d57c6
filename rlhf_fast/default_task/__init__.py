"""The embedded default: a word-level tokenizer built locally, a small Llama built from scratch, and the JSONL
files of the synthetic task (see `labeler.py`), so `rlhf-fast pipeline` needs no download."""
from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf_fast.config import ModelArch, TaskConfig
from rlhf_fast.default_task import labeler

SPECIAL = ("<pad>", "<eos>", "<unk>")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def build_tokenizer(out_dir: str | Path):
    """A word-level tokenizer over the task's vocabulary, built with `tokenizers`, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + labeler.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(arch: ModelArch, tokenizer, seed: int = 0):
    """A randomly initialised Llama (`models.llama.LlamaLM`) sized by `arch` for `tokenizer`'s vocabulary. Its
    weights are those transformers' `LlamaForCausalLM` initialises under `seed` (built once, its state loaded into
    ours by the state-dict adapter's names), so a run starts from the same weights whichever model class trains."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.models import build_model as build_decoder
    from rlhf_fast.models.state_dict_adapter import from_hf_name

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, max_position_embeddings=arch.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(cfg)
    state = {from_hf_name(k, cfg): v for k, v in hf.state_dict().items()}
    model = build_decoder(cfg, device="meta")
    model.load_state_dict({k: v for k, v in state.items() if k is not None}, strict=True, assign=True)
    return model


def _write(path: Path, rows: list[dict]) -> str:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


TASK_FILES = ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_prompts", "ppo_eval", "ptx")  # <name>.jsonl


def write_task_data(out_dir: str | Path, cfg: TaskConfig) -> dict[str, str]:
    """Write the task's JSONL files; returns their paths by name. Held-out prompts never appear in training."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)

    def problems(n: int, exclude: set) -> list:
        ps = []
        while len(ps) < n:
            p = labeler.random_problem(rng, cfg.min_items, cfg.max_items)
            if p not in exclude:
                ps.append(p)
        return ps

    held = set()
    eval_sets = {}
    for name in ("sft_eval", "rm_eval", "ppo_eval"):
        eval_sets[name] = problems(cfg.n_eval, held)
        held.update(eval_sets[name])

    def sft_rows(ps):
        return [{"prompt": labeler.prompt_text(p),
                 "response": labeler.demonstration(rng, p, cfg.p_verbose, cfg.p_wrong)} for p in ps]

    def rm_rows(ps):
        rows = []
        for p in ps:
            prompt = labeler.prompt_text(p)
            while True:
                comps = [labeler.candidate(rng, p) for _ in range(rng.randint(cfg.k_min, cfg.k_max))]
                ranks = labeler.rank(prompt, comps)
                if len(set(ranks)) > 1:
                    break
            rows.append({"prompt": prompt, "completions": comps, "ranks": ranks})
        return rows

    train = problems(cfg.n_sft + cfg.n_rm + cfg.n_ppo, held)
    sft_p, rm_p, ppo_p = train[: cfg.n_sft], train[cfg.n_sft: cfg.n_sft + cfg.n_rm], train[cfg.n_sft + cfg.n_rm:]
    return {
        "sft_train": _write(out / "sft_train.jsonl", sft_rows(sft_p)),
        "sft_eval": _write(out / "sft_eval.jsonl", sft_rows(eval_sets["sft_eval"])),
        "rm_train": _write(out / "rm_train.jsonl", rm_rows(rm_p)),
        "rm_eval": _write(out / "rm_eval.jsonl", rm_rows(eval_sets["rm_eval"])),
        "ppo_prompts": _write(out / "ppo_prompts.jsonl", [{"prompt": labeler.prompt_text(p)} for p in ppo_p]),
        "ppo_eval": _write(out / "ppo_eval.jsonl", [{"prompt": labeler.prompt_text(p)} for p in eval_sets["ppo_eval"]]),
        "ptx": _write(out / "ptx.jsonl", [{"text": labeler.prompt_text(p) + " " + " ".join(labeler.answer(p))}
                                          for p in sft_p]),
    }
