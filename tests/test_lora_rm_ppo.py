"""LoRA inside rlhf_fast's models (`rlhf_fast.models.lora`) in the RM and PPO stages, and gradient checkpointing.

The blocks apply the adapters (`layers.project`), so the packed training forward and the rollout engine read base +
adapter without a merged copy; PPO's reference is the policy's base with the adapters switched off. The oracle is peft
itself: our adapters exported in peft's format (`lora.save_adapter`) and loaded by `PeftModel.from_pretrained` onto
the transformers base."""
import json

import pytest
import torch

from _chat_models import build_model, build_tokenizer, chat_data
from _tiny import one_thread
from rlhf_fast.config import ConfigError, LoRAConfig, OptimConfig, ParallelConfig, PPOConfig, RMConfig, SamplingConfig
from rlhf_fast.config import load_config
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import load_model, lora, save_model
from rlhf_fast.models.lora import adapters_disabled
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.models.state_dict_adapter import to_hf_name
from rlhf_fast.stages.common import prepare

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
    """A Llama (tied, BOS) and a GPT-2 (HF Conv1D projections), a reward model on the Llama, chat data."""
    root = tmp_path_factory.mktemp("lora")
    tok = build_tokenizer(root / "tok", bos=True)
    for family in ("llama", "gpt2"):
        build_model(family, tok, root / family, positions=96)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        save_model(ScalarHeadModel(load_model(root / "llama", "llama")), root / "rm", tokenizer=tok)
    return root, tok, chat_data(root / "data")


def adapted(path, seed: int = 0, r: int = 4, dropout: float = 0.0):
    """Our model of the causal LM at `path` with LoRA adapters whose B is random (so they change the outputs)."""
    model = load_model(path, "model")
    lora.apply_lora(model, LoRAConfig(r=r, dropout=dropout))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    return model


def peft_twin(model, base_dir, tmp_path):
    """peft's model of the same base + adapters: `model`'s adapters saved in peft's format, loaded by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora.save_adapter(model, tmp_path / "adapter", base_dir=base_dir)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(tmp_path / "adapter"))


def hf_logits(lm, prompts=PROMPTS, responses=RESPONSES) -> torch.Tensor:
    """(T, V) the HF forward's logits of each sequence, concatenated (the packed stream's order)."""
    return torch.cat([lm(torch.tensor([p + r])).logits[0] for p, r in zip(prompts, responses)])


def our_logits(model, batch=None) -> torch.Tensor:
    return model.logits(packed_hidden(model, batch or pack(PROMPTS, RESPONSES)), False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_forward_and_engine_read_base_plus_adapter(own, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    root, _, _ = own
    model = adapted(root / family).eval()
    twin = peft_twin(model, root / family, tmp_path).eval()
    with torch.no_grad():
        want = hf_logits(twin)  # peft's own forward of base + adapter
        torch.testing.assert_close(our_logits(model), want, rtol=1e-5, atol=1e-5)
        assert (want - hf_logits(AutoModelForCausalLM.from_pretrained(str(root / family)).eval())).abs().max() > 1e-2
        comps = RolloutEngine(model).generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=3))
        for c in comps:  # the engine's sampled log-probs are those of peft's forward of base + adapter
            p, r = PROMPTS[c.prompt_index], list(c.token_ids)
            full = torch.log_softmax(twin(torch.tensor([p + r])).logits[0].float(), -1)
            expect = full[len(p) - 1:-1].gather(1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(c.logprobs.float(), expect, rtol=1e-5, atol=1e-5)
        greedy = RolloutEngine(model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0))[0]
        ids = torch.tensor([PROMPTS[0]])
        for _ in range(len(greedy.token_ids)):
            ids = torch.cat([ids, twin(ids).logits[:, -1:].argmax(-1)], 1)
        assert greedy.token_ids == ids[0, len(PROMPTS[0]):].tolist()
        with adapters_disabled(model):  # the reference: the frozen base, through the same forward
            base = AutoModelForCausalLM.from_pretrained(str(root / family)).eval()
            torch.testing.assert_close(our_logits(model), hf_logits(base), rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(not m.disabled for m in lora.lora_modules(model).values())  # switched back on


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deterministic_engine_with_adapters_is_batch_invariant(own, family):
    from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs

    root, _, _ = own
    model = adapted(root / family).eval()
    outs = RolloutEngine(model, block_size=4, deterministic=True).generate(PROMPTS, SamplingParams(
        max_new_tokens=6, n=2, seed=5))
    prompts = [PROMPTS[o.prompt_index] for o in outs]
    rev = teacher_forced_logprobs(model, prompts[::-1], outs[::-1], deterministic=True, block_size=4)[::-1]
    assert all(torch.equal(o.logprobs, r) for o, r in zip(outs, rev))  # bitwise, whatever the batch around it


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_gradients_reach_the_adapters_as_peft_forward_does(own, tmp_path, family):
    root, _, _ = own
    model = adapted(root / family).train()
    twin = peft_twin(model, root / family, tmp_path).eval()  # HF GPT-2 has dropout 0.1; ours has none
    twin.requires_grad_(False)
    for n, p in twin.named_parameters():
        p.requires_grad_("lora_" in n)
    (our_logits(model).logsumexp(-1).sum()).backward()
    (hf_logits(twin).float().logsumexp(-1).sum()).backward()
    theirs = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours and all("lora_" in n for n in ours) and len(ours) == len(theirs)
    for n, g in ours.items():
        module, ab = n.rsplit(".lora_", 1)
        hf = to_hf_name(f"{module}.weight", model).removesuffix(".weight")
        torch.testing.assert_close(g, theirs[f"base_model.model.{hf}.lora_{ab.replace('.weight', '')}.default.weight"],
                                   rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_equal_loss_and_gradients(own, family):
    """`prepare(gradient_checkpointing=True)` on an adapted model whose LoRA dropout is on: the recompute draws the
    same masks, so loss and every gradient (base included) are those of the plain model."""
    root, _, _ = own
    runs = []
    for on in (False, True):
        model = adapted(root / family, dropout=0.3)
        model.requires_grad_(True)  # every parameter, base included
        model = prepare(model, device=torch.device("cpu"), parallel_cfg=ParallelConfig(),
                        gradient_checkpointing=on).train()
        torch.manual_seed(7)
        saved = []  # elements autograd keeps for the backward outside checkpointed regions
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            h = packed_hidden(model, pack(PROMPTS, RESPONSES, share_prompts=False))
        loss = model.logits(h, False).logsumexp(-1).mean()
        loss.backward()
        runs.append((loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                                     for n, p in model.named_parameters()}, sum(saved)))
    assert runs[1][2] < runs[0][2] / 3  # the layers' activations are recomputed, not stored
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    for n, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], g, rtol=1e-6, atol=1e-7)


def test_lora_targets_outside_the_decoder_projections_are_refused(own):
    root, _, _ = own
    for target in ("embed", "lm_head,q_proj"):
        with pytest.raises(ConfigError, match="lora.target_modules: .* matches no projection of this model; its "
                                              "projections are named down_proj, gate_proj, k_proj, o_proj"):
            lora.apply_lora(load_model(root / "llama", "m"), LoRAConfig(r=2, target_modules=target))


def test_rm_and_ppo_configs_take_lora_keys():
    assert load_config(RMConfig, None, ["lora.r=8", "lora.target_modules=q_proj,v_proj"]).lora.r == 8
    cfg = load_config(PPOConfig, None, ["lora.r=4", "lora.alpha=8", "gradient_checkpointing=true"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.gradient_checkpointing) == (4, 8.0, True)
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
    ScalarHeadModel.from_pretrained(final)  # loads like any RM directory: merged backbone + head
    merged = AutoModel.from_pretrained(str(final)).eval()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, src[k])}
    assert changed and all("proj" in k for k in changed)  # only the adapted linears moved (merged in)
    head = load_file(str(final / "scalar_head.safetensors"))
    start = ScalarHeadModel.from_pretrained(root / "llama", new_head=True)  # not the trained head
    assert not torch.equal(head["weight"], start.head.weight.detach())
    with_adapter = PeftModel.from_pretrained(base, str(final / "adapter")).eval()  # peft's own loader
    ids = torch.tensor([[1, 3, 40, 41, 42, 4, 3]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).last_hidden_state,
                                   merged(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def _ppo_cfg(root, files, **kw) -> PPOConfig:
    base = dict(policy=str(root / "llama"), reward_model=str(root / "rm"), prompts=files["ppo"], iterations=2,
                prompts_per_iter=4, sampling=SamplingConfig(n=2, max_new_tokens=6), ppo_epochs=1, minibatch_size=8,
                optim=FAST, lora=LoRAConfig(r=4), old_logp="recompute")
    return PPOConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_ppo_trains_adapters_from_a_zero_kl_start_and_its_adapter_reloads(own, family):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_fast.stages.ppo import train_ppo

    root, _, files = own
    out = root / f"ppo-lora-{family}"
    cfg = _ppo_cfg(root, files, policy=str(root / family))
    train_ppo(cfg, out, plots=False)
    if family == "llama":  # stopped after one iteration and resumed: the same run
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
    from rlhf_fast.models.loading import load_tokenizer
    from rlhf_fast.stages.ppo import PPOTrainer

    root, tok, files = own
    cfg = _ppo_cfg(root, files)
    policy = load_model(root / "llama", "policy")
    lora.apply_lora(policy, cfg.lora)
    value = ScalarHeadModel.from_pretrained(root / "rm")
    lora.apply_lora(value, cfg.lora, seed=1)
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
