"""Own models and chat data through the `rlhf-fast` CLI (in process): SFT -> RM -> PPO on a ChatML Llama with BOS
and on a GPT-2 with dropout 0.1 and tied weights, a bf16 Qwen2 checkpoint that comes back bf16, and the checks PPO
makes before it trains."""
import dataclasses
import json
import logging

import pytest
import torch

from _chat_models import build_model, build_tokenizer, chat, chat_data, write_jsonl
from _tiny import one_thread
from rlhf_fast import cli, precision
from rlhf_fast.config import ConfigError
from rlhf_fast.data import DataError
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import load_model, save_model


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A Llama (tied embeddings, BOS) and its scalar head model, a GPT-2 and a Qwen2 saved in bf16, with their
    tokenizers, and chat data."""
    root = tmp_path_factory.mktemp("own-cli")
    tok = build_tokenizer(root / "tok-bos", bos=True)
    build_model("llama", tok, root / "llama", positions=96)
    save_model(ScalarHeadModel(load_model(root / "llama", "llama")), root / "llama-rm", tokenizer=tok)
    qtok = build_tokenizer(root / "tok", bos=False)
    build_model("gpt2", qtok, root / "gpt2", positions=96)
    build_model("qwen2", qtok, root / "qwen2-fp32")
    save_model(load_model(root / "qwen2-fp32", "qwen2"), root / "qwen2", dtype=torch.bfloat16, tokenizer=qtok)
    return root, chat_data(root / "data")


def run(*args):
    with one_thread():  # --debug: an error propagates as itself (without it the CLI prints one line, exit 2)
        assert cli.main([*args, "--debug"]) == 0


@pytest.mark.parametrize("family, ppo_args", [
    ("llama", ["--set", "gradient_checkpointing=true"]),  # every stage recomputes its blocks in the backward
    ("gpt2", []),
])
def test_chat_data_sft_rm_ppo_through_the_cli(own, caplog, family, ppo_args):
    root, files = own
    out = root / f"run-{family}"
    small = ["--set", "batch_size=4", "--set", "max_steps=2", *ppo_args]
    run("sft", "--set", f"model={root / family}", "--set", f"train_data={files['sft']}", *small,
        "--out", str(out / "sft"))
    run("rm", "--set", f"model={out / 'sft' / 'final'}", "--set", f"train_data={files['rm']}", *small,
        "--out", str(out / "rm"))
    with caplog.at_level(logging.WARNING):
        run("ppo", "--set", f"policy={out / 'sft' / 'final'}", "--set", f"reward_model={out / 'rm' / 'final'}",
            "--set", f"prompts={files['ppo']}", "--set", "iterations=1", "--set", "prompts_per_iter=4",
            "--set", "sampling.n=2", "--set", "sampling.max_new_tokens=8", "--set", "minibatch_size=8",
            "--set", f"ptx_data={files['ppo']}", *ppo_args, "--out", str(out / "ppo"))
    assert "ptx_coef is 0, so the ptx texts are not used" in caplog.text
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 1
    for d in ("sft/final", "rm/final", "ppo/final/policy"):
        assert precision.checkpoint_dtype(out / d) == torch.float32  # an fp32 checkpoint stays fp32
    cut = out / "sft-cut"  # a budget that cuts: the run dir says how many were cut
    run("sft", "--set", f"model={root / family}", "--set", f"train_data={files['sft']}", "--set", "max_len=12",
        *small, "--out", str(cut))
    counts = json.loads((cut / "truncation.json").read_text())[files["sft"]]
    from rlhf_fast.data import load_sft
    from rlhf_fast.models.loading import load_tokenizer

    assert counts == dataclasses.asdict(load_sft(files["sft"], load_tokenizer(root / family, "x"), 12).counts)
    assert counts["prompts_cut"] + counts["responses_cut"] > 0


def test_bf16_checkpoint_comes_back_bf16(own):
    root, files = own
    run("sft", "--set", f"model={root / 'qwen2'}", "--set", f"train_data={files['sft']}", "--set", "batch_size=4",
        "--set", "max_steps=1", "--set", "mixed_precision=bf16", "--out", str(root / "sft-bf16"))
    assert precision.checkpoint_dtype(root / "sft-bf16" / "final") == torch.bfloat16
    from safetensors import safe_open

    with safe_open(str(root / "sft-bf16" / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    run("rm", "--set", f"model={root / 'sft-bf16' / 'final'}", "--set", f"train_data={files['rm']}",
        "--set", "batch_size=4", "--set", "max_steps=1", "--out", str(root / "rm-bf16"))
    # PPO holds the reference and the reward model in bf16, trains fp32 masters under bf16 autocast, saves bf16
    run("ppo", "--set", f"policy={root / 'sft-bf16' / 'final'}", "--set", f"reward_model={root / 'rm-bf16' / 'final'}",
        "--set", f"prompts={files['ppo']}", "--set", "iterations=1", "--set", "prompts_per_iter=4",
        "--set", "sampling.max_new_tokens=6", "--set", "minibatch_size=8", "--set", "mixed_precision=bf16",
        "--set", "old_logp=recompute", "--out", str(root / "ppo-bf16"))
    for d in ("rm-bf16/final", "ppo-bf16/final/policy", "ppo-bf16/final/value"):
        assert precision.checkpoint_dtype(root / d) == torch.bfloat16, d
    row = json.loads((root / "ppo-bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN from the bf16 frozen passes


def test_ppo_refuses_a_reward_model_with_another_tokenizer(own):
    root, files = own
    with pytest.raises(ConfigError, match="reward_model: .* has a different tokenizer from the policy"):
        run("ppo", "--set", f"policy={root / 'llama'}", "--set", f"reward_model={root / 'qwen2'}",
            "--set", f"prompts={files['ppo']}", "--out", str(root / "ppo-bad"))
    assert not (root / "ppo-bad" / "metrics.jsonl").exists()


def test_ppo_checks_every_prompt_against_the_context_at_load(own):
    root, files = own
    rows = [{"messages": chat(i)} for i in range(2)] + [{"messages": chat(2, turns=6)}]
    path = write_jsonl(root / "data" / "long.jsonl", rows)
    base = ["ppo", "--set", f"policy={root / 'llama'}", "--set", f"reward_model={root / 'llama-rm'}",
            "--set", f"prompts={path}", "--set", "sampling.max_new_tokens=30", "--out", str(root / "ppo-long")]
    with pytest.raises(DataError, match=r"long.jsonl:3: the prompt is \d+ tokens, over the 66 that fit"):
        run(*base, "--set", "overlong=error")  # 96 positions - 30 new tokens
    with pytest.raises(ConfigError, match="ppo.max_new_tokens: the model has 96 positions"):
        run(*base[:-2], "--set", "sampling.max_new_tokens=96", "--out", str(root / "ppo-long"))
    assert not (root / "ppo-long" / "metrics.jsonl").exists()


def test_pipeline_checks_the_eval_prompts_before_sft(own):
    root, files = own
    path = write_jsonl(root / "data" / "eval-long.jsonl", [{"messages": chat(0)}, {"messages": chat(1, turns=6)}])
    with pytest.raises(DataError, match=r"eval-long.jsonl:2: the prompt is \d+ tokens"):
        run("pipeline", "--set", f"sft.model={root / 'llama'}", "--set", f"sft.train_data={files['sft']}",
            "--set", f"rm.train_data={files['rm']}", "--set", f"ppo.prompts={files['ppo']}",
            "--set", f"eval_prompts={path}", "--set", "ppo.overlong=error", "--out", str(root / "pipe"))
    assert not (root / "pipe" / "sft").exists()  # nothing trained


def test_default_ppo_config_fits_prompts_into_the_default_model():
    from rlhf_fast.config import ModelArch, PPOConfig
    from rlhf_fast.preflight import prompt_budget
    from transformers import LlamaConfig

    cfg, positions = PPOConfig(), ModelArch().max_position_embeddings
    budget = prompt_budget(cfg.max_len, LlamaConfig(max_position_embeddings=positions), cfg.sampling.max_new_tokens)
    assert 0 < budget and budget + cfg.sampling.max_new_tokens <= positions


@pytest.mark.parametrize("key, value", [("overlong", "cut"), ("assistant_turns", "first"), ("model_dtype", "fp8"),
                                                 ("mixed_precision", "fp16")])
def test_bad_data_options_are_config_errors(key, value, capsys):
    assert cli.main(["sft", "--set", f"{key}={value}"]) == 2
    assert f"{key}: must be" in capsys.readouterr().err


def test_lora_sft_trains_only_adapters_resumes_and_saves_them_in_peft_format(own):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_fast.config import SFTConfig, load_config
    from rlhf_fast.stages.sft import train_sft

    root, files = own
    sets = [f"model={root / 'llama'}", f"train_data={files['sft']}", "batch_size=4", "max_steps=3", "lora.r=4",
            "optim.lr=1e-2"]
    run("sft", *[a for kv in sets for a in ("--set", kv)], "--out", str(root / "lora"))
    with one_thread():  # the same run, interrupted after one step and resumed from its adapter checkpoint
        cfg = load_config(SFTConfig, None, sets)
        train_sft(cfg, root / "lora-resumed", stop_after=1, plots=False)
        train_sft(cfg, root / "lora-resumed", plots=False)
    final = root / "lora" / "final"
    a = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "lora-resumed" / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base = AutoModelForCausalLM.from_pretrained(str(root / "llama")).eval()
    src = {k: v.clone() for k, v in base.state_dict().items()}
    merged = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, src[k])}
    assert changed and all("proj" in k for k in changed)  # adapters moved the linears; embeddings, norms untouched
    adapted = PeftModel.from_pretrained(base, str(final / "adapter")).eval()  # base + adapter, peft's own loader
    ids = torch.tensor([[1, 3, 40, 41, 42, 4, 3]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_needs_a_pretrained_base(capsys):
    assert cli.main(["sft", "--set", "lora.r=4"]) == 2
    assert "lora.r: LoRA needs `model`" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3", "olmo2"])
def test_every_family_runs_sft_rm_ppo_through_the_cli(tmp_path, family):
    """Issue 22's families through `rlhf-fast sft`, `rm` and `ppo` on chat data (PPO: LoRA on the policy, so the
    export writes the merged model and the peft adapter too), each stage's export loading back."""
    from _chat_models import build_model as build

    tok = build_tokenizer(tmp_path / "tok", bos=False)
    build(family, tok, tmp_path / family, positions=96)
    files = chat_data(tmp_path / "data")
    out = tmp_path / "run"
    small = ["--set", "batch_size=4", "--set", "max_steps=1"]
    run("sft", "--set", f"model={tmp_path / family}", "--set", f"train_data={files['sft']}", *small,
        "--out", str(out / "sft"))
    run("rm", "--set", f"model={out / 'sft' / 'final'}", "--set", f"train_data={files['rm']}", *small,
        "--out", str(out / "rm"))
    run("ppo", "--set", f"policy={out / 'sft' / 'final'}", "--set", f"reward_model={out / 'rm' / 'final'}",
        "--set", f"prompts={files['ppo']}", "--set", "iterations=1", "--set", "prompts_per_iter=2",
        "--set", "sampling.n=2", "--set", "sampling.max_new_tokens=4", "--set", "minibatch_size=4",
        "--set", "lora.r=2", "--out", str(out / "ppo"))
    policy = load_model(out / "ppo" / "final" / "policy", "policy")
    assert type(policy).__name__ == type(load_model(tmp_path / family, "base")).__name__
    assert (out / "ppo" / "final" / "policy" / "adapter" / "adapter_config.json").is_file()
    assert ScalarHeadModel.from_pretrained(out / "rm" / "final").lm.lm_head is None
