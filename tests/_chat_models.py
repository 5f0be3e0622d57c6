"""Locally built "own models" for the chat-data tests: a byte-level BPE tokenizer trained with `tokenizers`, a
ChatML chat template, and tiny Hugging Face models of three families (Qwen2 with GQA, GPT-2 with dropout 0.1 and
tied weights, Llama with tied embeddings and a BOS token)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("you are a helpful assistant . copy sort reverse the letters a b c d e f g h please answer briefly "
         "sure here is it hello how are you fine thanks what is two plus three five").split()


def corpus(n: int = 200) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g).tolist()) for _ in range(n)]


def build_tokenizer(out_dir: str | Path, *, bos: bool, vocab_size: int = 300):
    """A byte-level BPE tokenizer (<= `vocab_size` ids) with the ChatML template; `bos`: Llama-style, it adds
    `<s>` to every encoded string and the template writes `<s>` too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>" if bos else None,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{{ bos_token }}" if bos else "") + CHATML
    fast.save_pretrained(str(out_dir))
    return fast


def _small(positions: int, common: dict) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, max_position_embeddings=positions, **common)


NEW_FAMILIES = {  # issue 22's families: (config, class) for (transformers, positions, vocab/special tokens)
    "qwen3": lambda tf, n, c: (tf.Qwen3Config(**_small(n, c)), tf.Qwen3ForCausalLM),
    "qwen3_moe": lambda tf, n, c: (tf.Qwen3MoeConfig(**_small(n, c), num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, norm_topk_prob=True),
                                   tf.Qwen3MoeForCausalLM),
    "mixtral": lambda tf, n, c: (tf.MixtralConfig(**_small(n, c), num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=16), tf.MixtralForCausalLM),
    "gemma2": lambda tf, n, c: (tf.Gemma2Config(**_small(n, c), sliding_window=16, query_pre_attn_scalar=8,
                                                attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
                                tf.Gemma2ForCausalLM),
    "gemma3": lambda tf, n, c: (tf.Gemma3TextConfig(**_small(n, c), sliding_window=16, query_pre_attn_scalar=8,
                                                    final_logit_softcapping=10.0), tf.Gemma3ForCausalLM),
    "phi3": lambda tf, n, c: (tf.Phi3Config(**{k: v for k, v in _small(n, c).items() if k != "head_dim"},
                                            tie_word_embeddings=False),
                              tf.Phi3ForCausalLM),
    "olmo2": lambda tf, n, c: (tf.Olmo2Config(**_small(n, c)), tf.Olmo2ForCausalLM),
}


def build_model(family: str, tokenizer, out_dir: str | Path, *, positions: int = 128):
    """A tiny randomly initialised model of `family` (llama | qwen2 | gpt2 | one of `NEW_FAMILIES`), saved with
    `tokenizer`."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True,
                             **common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, max_position_embeddings=positions, tie_word_embeddings=False,
                             **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=positions, resid_pdrop=0.1,
                            embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True, **common)
        cls = tf.GPT2LMHeadModel
    elif family in NEW_FAMILIES:
        cfg, cls = NEW_FAMILIES[family](tf, positions, common)
    else:
        raise ValueError(family)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(cfg)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


SYSTEM = {"role": "system", "content": "you are a helpful assistant ."}


def chat(i: int, turns: int = 1) -> list[dict]:
    """A chat ending with a user turn: a system turn, then `turns` user turns with assistant answers between."""
    msgs = [SYSTEM]
    for t in range(turns):
        if t:
            msgs.append({"role": "assistant", "content": "sure here is it"})
        msgs.append({"role": "user", "content": f"please {WORDS[8 + (i + t) % 3]} the letters a b c"})
    return msgs


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_data(root: Path, n: int = 8) -> dict[str, str]:
    """SFT, RM and PPO files in chat form (the same prompts in all three), under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    sft = [{"messages": chat(i) + [{"role": "assistant", "content": "sure a b c"}]} for i in range(n)]
    rm = [{"prompt": chat(i), "chosen": {"role": "assistant", "content": "a b c"},
           "rejected": {"role": "assistant", "content": "hello how are you"}} for i in range(n)]
    ppo = [{"messages": chat(i)} for i in range(n)]
    return {"sft": write_jsonl(root / "sft.jsonl", sft), "rm": write_jsonl(root / "rm.jsonl", rm),
            "ppo": write_jsonl(root / "ppo.jsonl", ppo)}
