"""LoRA through peft in the RM and PPO stages, and gradient checkpointing in the padding-free forwards.

The compact models apply the adapters (`layers.project`), so the packed training forward and the rollout engine
read base + adapter without a merged copy; PPO's reference is the policy's base with the adapters switched off."""
import json

import pytest
import torch

from _chat_models import build_model, build_tokenizer, chat_data
from _tiny import one_thread
from rlhf_fast import precision
from rlhf_fast.config import (ConfigError, LoRAConfig, OptimConfig, PPOConfig, RMConfig, SamplingConfig,
                              load_config)
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import disable_dropout, lora, output_head
from rlhf_fast.models.lora import LoRALM, adapters_disabled
from rlhf_fast.models.packed import pack, packed_hidden

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14]]
RESPONSES = [[20, 21, 22], [23, 24], [25, 26, 27, 28]]
FAST = OptimConfig(lr=1e-2)  # a few steps move the adapters visibly
PROJECTIONS = {"llama": ("proj.weight",), "gpt2": ("c_attn.weight", "c_proj.weight", "c_fc.weight")}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: one thread is fastest, and leaves the other core alone
        yield


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A Llama (tied, BOS) and a GPT-2 (Conv1D projections, dropout 0.1), a reward model on the Llama, chat data."""
    root = tmp_path_factory.mktemp("lora")
    tok = build_tokenizer(root / "tok", bos=True)
    for family in ("llama", "gpt2"):
        build_model(family, tok, root / family, positions=96)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ScalarHeadModel(build_model("llama", tok, root / "llama-copy", positions=96)).save_pretrained(root / "rm")
    tok.save_pretrained(str(root / "rm"))
    return root, tok, chat_data(root / "data")


def adapted(path, family_seed: int = 0, r: int = 4, dropout: float = 0.0):
    """The causal LM at `path` with LoRA adapters whose B is random (so the adapters change the outputs)."""
    from transformers import AutoModelForCausalLM

    wrapped = LoRALM.wrap(AutoModelForCausalLM.from_pretrained(str(path)), LoRAConfig(r=r, dropout=dropout), path)
    g = torch.Generator().manual_seed(family_seed)
    with torch.no_grad():
        for name, p in wrapped.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return wrapped


def hf_logits(lm, prompts=PROMPTS, responses=RESPONSES) -> torch.Tensor:
    """(T, V) the HF forward's logits of each sequence, concatenated (the packed stream's order)."""
    return torch.cat([lm(torch.tensor([p + r])).logits[0] for p, r in zip(prompts, responses)])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_forward_and_engine_read_base_plus_adapter(own, family):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    root, _, _ = own
    lm = adapted(root / family).lm.eval()
    weight, bias = output_head(lm)
    batch = pack(PROMPTS, RESPONSES)
    with torch.no_grad():
        want = hf_logits(lm)  # peft's own forward of base + adapter
        got = packed_hidden(lm, batch) @ weight.t()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (want - hf_logits(AutoModelForCausalLM.from_pretrained(str(root / family)).eval())).abs().max() > 1e-2
        comps = RolloutEngine(lm).generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=3))
        for c in comps:  # the engine's sampled log-probs are those of peft's forward of base + adapter
            p, r = PROMPTS[c.prompt_index], list(c.token_ids)
            full = torch.log_softmax(lm(torch.tensor([p + r])).logits[0].float(), -1)
            expect = full[len(p) - 1:-1].gather(1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(c.logprobs.float(), expect, rtol=1e-5, atol=1e-5)
        greedy = RolloutEngine(lm).generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0))[0]
        ids = torch.tensor([PROMPTS[0]])
        for _ in range(len(greedy.token_ids)):
            ids = torch.cat([ids, lm(ids).logits[:, -1:].argmax(-1)], 1)
        assert greedy.token_ids == ids[0, len(PROMPTS[0]):].tolist()
        with adapters_disabled(lm):  # the reference: the frozen base, through the same compact forward
            base = AutoModelForCausalLM.from_pretrained(str(root / family)).eval()
            torch.testing.assert_close(packed_hidden(lm, batch) @ weight.t(), hf_logits(base), rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for n, p in lm.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in lm.named_parameters() if "lora_" in n)  # switched back on


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deterministic_engine_with_adapters_is_batch_invariant(own, family):
    from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs

    root, _, _ = own
    lm = adapted(root / family).lm.eval()
    outs = RolloutEngine(lm, block_size=4, deterministic=True).generate(PROMPTS, SamplingParams(
        max_new_tokens=6, n=2, seed=5))
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    rev = teacher_forced_logprobs(lm, prompts[::-1], outs[::-1], deterministic=True, block_size=4)[::-1]
    assert all(torch.equal(o.logprobs, r) for o, r in zip(outs, rev))  # bitwise, whatever the batch around it


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_gradients_reach_the_adapters_as_peft_forward_does(own, family):
    root, _, _ = own
    lm = disable_dropout(adapted(root / family).lm.train())  # GPT-2's dropout 0.1 is in HF's forward only
    weight, _ = output_head(lm)
    grads = []
    for forward in (lambda: packed_hidden(lm, pack(PROMPTS, RESPONSES)) @ weight.t(), lambda: hf_logits(lm)):
        lm.zero_grad(set_to_none=True)
        (forward().float().logsumexp(-1).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_gradient_checkpointing_gives_equal_loss_and_gradients(own, family):
    root, _, _ = own
    lm = adapted(root / family, dropout=0.3).lm.train()  # LoRA dropout: the recompute must draw the same masks
    lm.requires_grad_(True)  # every parameter, base included
    weight, _ = output_head(lm)
    runs = []
    for on in (False, True):
        if on:
            precision.enable_gradient_checkpointing(lm)
        assert precision.is_checkpointing(lm) == on
        lm.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        saved = []  # elements autograd keeps for the backward outside checkpointed regions
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            h = packed_hidden(lm, pack(PROMPTS, RESPONSES, share_prompts=False))
        loss = (h @ weight.t()).logsumexp(-1).mean()
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}, sum(saved)))
    assert runs[1][2] < runs[0][2] / 3  # the layers' activations are recomputed, not stored
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    for n, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], g, rtol=1e-6, atol=1e-7)


def test_lora_targets_outside_the_decoder_projections_are_refused(own):
    from transformers import AutoModelForCausalLM

    root, _, _ = own
    for target in ("embed_tokens", "lm_head,q_proj"):
        with pytest.raises(ConfigError, match="lora.target_modules: .* is not a decoder projection"):
            LoRALM.wrap(AutoModelForCausalLM.from_pretrained(str(root / "llama")),
                        LoRAConfig(r=2, target_modules=target), root / "llama")


def test_lora_is_refused_under_torchrun(monkeypatch):
    from rlhf_fast import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="lora.r: LoRA runs in one process"):
        lora.refuse_sharded()


def test_rm_and_ppo_configs_take_lora_keys():
    assert load_config(RMConfig, None, ["lora.r=8", "lora.target_modules=q_proj,v_proj"]).lora.r == 8
    cfg = load_config(PPOConfig, None, ["lora.r=4", "lora.alpha=8", "gradient_checkpointing=true"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train_model, cfg.gradient_checkpointing) == (4, 8.0, "ours", True)
    with pytest.raises(ConfigError, match="lora.r: must be >= 0"):
        load_config(PPOConfig, None, ["lora.r=-1"])


def _rm_cfg(root, files, **kw) -> RMConfig:
    return RMConfig(model=str(root / "llama"), train_data=files["rm"], batch_size=4, max_steps=3,
                    lora=LoRAConfig(r=4), optim=FAST, **kw)


def test_lora_rm_trains_adapters_and_head_resumes_exactly_and_exports(own):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from rlhf_fast.stages.rm import train_rm

    root, _, files = own
    train_rm(_rm_cfg(root, files), root / "rm-lora", plots=False)
    train_rm(_rm_cfg(root, files), root / "rm-lora-resumed", stop_after=1, plots=False)
    train_rm(_rm_cfg(root, files), root / "rm-lora-resumed", plots=False)
    final = root / "rm-lora" / "final"
    for f in ("adapter/adapter_model.safetensors", "scalar_head.safetensors"):
        a, b = load_file(str(final / f)), load_file(str(root / "rm-lora-resumed" / "final" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4

    base = AutoModel.from_pretrained(str(root / "llama")).eval()
    src = {k: v.clone() for k, v in base.state_dict().items()}
    rm = ScalarHeadModel.from_pretrained(final).eval()  # loads like any RM directory: merged backbone + head
    changed = {k for k, v in rm.lm.state_dict().items() if not torch.equal(v, src[k])}
    assert changed and all("proj" in k for k in changed)  # only the adapted linears moved (merged in)
    head = load_file(str(final / "scalar_head.safetensors"))
    start = ScalarHeadModel.from_pretrained(root / "llama", new_head=True)  # not the trained head
    assert not torch.equal(head["weight"], start.head.weight.detach())
    with_adapter = PeftModel.from_pretrained(base, str(final / "adapter")).eval()  # peft's own loader
    ids = torch.tensor([[1, 3, 40, 41, 42, 4, 3]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).last_hidden_state,
                                   rm.lm(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def _ppo_cfg(root, files, **kw) -> PPOConfig:
    base = dict(policy=str(root / "llama"), reward_model=str(root / "rm"), prompts=files["ppo"], iterations=2,
                prompts_per_iter=4, sampling=SamplingConfig(n=2, max_new_tokens=6), ppo_epochs=1, minibatch_size=8,
                optim=FAST, lora=LoRAConfig(r=4), old_logp="recompute")
    return PPOConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family, train_model", [("llama", "ours"), ("llama", "hf"), ("gpt2", "ours")])
def test_lora_ppo_trains_adapters_from_a_zero_kl_start_and_its_adapter_reloads(own, family, train_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_fast.stages.ppo import train_ppo

    root, _, files = own
    out = root / f"ppo-lora-{family}-{train_model}"
    cfg = _ppo_cfg(root, files, train_model=train_model, policy=str(root / family))
    train_ppo(cfg, out, plots=False)
    if family == "llama" and train_model == "ours":  # stopped after one iteration and resumed: the same run
        train_ppo(cfg, root / "ppo-lora-resumed", stop_after=1, plots=False)
        train_ppo(cfg, root / "ppo-lora-resumed", plots=False)
        for f in ("policy/adapter/adapter_model.safetensors", "value/adapter/adapter_model.safetensors"):
            a, b = (load_file(str(d / "final" / f)) for d in (out, root / "ppo-lora-resumed"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    first, second = _rows(out / "metrics.jsonl")
    # step 0: the adapters are zero (B = 0), so policy == its adapter-disabled base == reference, exactly
    assert first["kl"] == 0.0 and first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0
    assert second["kl"] != 0.0  # the first update moved the adapters
    policy = out / "final" / "policy"
    cfg = json.loads((policy / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(root / family) and cfg["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(str(root / family)).eval()
    src = {k: v.clone() for k, v in base.state_dict().items()}
    merged = AutoModelForCausalLM.from_pretrained(str(policy)).eval()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, src[k])}
    assert changed and all(k.endswith(PROJECTIONS[family]) for k in changed)  # embeddings, norms untouched
    reloaded = PeftModel.from_pretrained(base, str(policy / "adapter")).eval()
    ids = torch.tensor([[1, 3, 40, 41, 42, 4, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    value = out / "final" / "value"
    assert (value / "adapter" / "adapter_config.json").is_file() and (value / "scalar_head.safetensors").is_file()
    ScalarHeadModel.from_pretrained(value)  # a plain value-model directory


def test_lora_ppo_trainer_holds_no_reference_copy_and_leaves_the_base_bitwise(own):
    from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
    from rlhf_fast.stages.ppo import PPOTrainer

    root, tok, files = own
    cfg = _ppo_cfg(root, files)
    wrapped = LoRALM.wrap(load_causal_lm(root / "llama"), cfg.lora, root / "llama")
    policy = wrapped.lm
    value = lora.add_to_scalar_head(ScalarHeadModel.from_pretrained(root / "rm"), cfg.lora, root / "rm", seed=1)
    rm = ScalarHeadModel.from_pretrained(root / "rm").eval().requires_grad_(False)
    trainer = PPOTrainer(cfg, policy, value, policy, rm, load_tokenizer(root / "llama"))
    frozen = {n: p.detach().clone() for m in (policy, value) for n, p in m.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainable = {n for g in trainer.groups for m in (policy, value) for n, p in m.named_parameters()
                 if any(p is q for q in g)}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    prompts = [tok.apply_chat_template([{"role": "user", "content": "please sort the letters a b c"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)] * 4
    m0 = trainer.iteration(prompts, 0)
    m1 = trainer.iteration(prompts, 1)
    assert m0["kl"] == 0.0 and m0["approx_kl"] == 0.0 and m1["kl"] != 0.0
    named = dict(policy.named_parameters()) | dict(value.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())  # the base never moves, bit for bit
    assert any(not torch.equal(named[n], v) for n, v in adapters.items())
    assert trainer.ref is trainer.policy  # the reference is the policy's base (adapters off), no second copy


@pytest.mark.parametrize("r", [0, 4])
def test_ppo_gradient_checkpointing_with_the_packed_forward_gives_the_same_run(own, r):
    from safetensors.torch import load_file

    from rlhf_fast.stages.ppo import train_ppo

    root, _, files = own
    outs = []
    for on in (False, True):
        out = root / f"ppo-ckpt-{r}-{on}"
        train_ppo(_ppo_cfg(root, files, iterations=1, lora=LoRAConfig(r=r), gradient_checkpointing=on), out,
                  plots=False)
        outs.append((_rows(out / "metrics.jsonl")[0], load_file(str(out / "final" / "policy" / "model.safetensors"))))
    (m_off, w_off), (m_on, w_on) = outs
    for k in ("pg_loss", "vf_loss", "entropy", "grad_norm"):
        assert m_on[k] == pytest.approx(m_off[k], rel=1e-6, abs=1e-7), k
    for k in w_off:
        torch.testing.assert_close(w_on[k], w_off[k], rtol=1e-5, atol=1e-6)
