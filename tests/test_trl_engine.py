"""Generation in the TRL plug-in's GRPO and RLOO trainers on RolloutEngine (rlhf_fast/integrations/_trl_generate.py),
against TRL's own installed code (tests/_peers.py): the engine's log-probs are the old policy's log-probs TRL's
forward pass computes (so that pass is skipped), with PEFT adapters read unmerged; TRL's sampling arguments reach
the engine, what it cannot sample is refused or left to TRL's generate; TRL's loss on the engine's completions
equals ours."""
import itertools
import types
import warnings

import pytest
import torch

import _peers

_SAVED = itertools.count()
PROMPTS = ["user : reverse a b assistant :", "user : reverse c d e assistant :", "user : sort b a assistant :",
           "user : copy e assistant :"]


@pytest.fixture(scope="module", params=_peers.versions("trl"))
def env(request, tmp_path_factory):
    with _peers.plugin("trl", request.param) as plugin:
        import datasets
        import trl
        from datasets.table import InMemoryTable

        from rlhf_fast.default_task import build_tokenizer

        root = tmp_path_factory.mktemp("trl_engine")
        tok = build_tokenizer(root / "tok")
        ds = datasets.Dataset(InMemoryTable.from_pydict({"prompt": PROMPTS * 2}), fingerprint="rlhf_fast-engine")
        yield types.SimpleNamespace(trl=trl, plugin=plugin, tok=tok, root=root, ds=ds)


def _model(tok, family="llama", seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if family == "gptneox":  # a family the engine does not cover
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    cls, cfg = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    return cls(cfg(num_key_value_heads=2, **common))


def _trainer(env, kind="GRPO", *, model=None, backend="auto", peft_config=None, **cfg):
    trl = env.trl
    config_cls = trl.GRPOConfig if kind == "GRPO" else trl.RLOOConfig
    defaults = dict(output_dir=str(env.root / "out"), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=9, use_cpu=True, report_to="none", temperature=0.8, bf16=False,
                    num_iterations=2, save_strategy="no")
    args = config_cls(**{**defaults, **cfg})
    cls = getattr(env.plugin, f"{kind}Trainer")
    model = model if model is not None else _model(env.tok)
    if args.beta != 0.0 and peft_config is None:  # TRL loads its reference model from the policy's path
        path = env.root / f"init-{next(_SAVED)}"
        model.save_pretrained(path)
        model = str(path)
    return cls(model=model, args=args, train_dataset=env.ds,
               processing_class=env.tok, reward_funcs=lambda completions, **kw: [1.0 * len(c) for c in completions],
               peft_config=peft_config, generation_backend=backend)


def _batch(n=2):
    return [{"prompt": p} for p in PROMPTS[:2] for _ in range(n)]


def _count_policy_passes(monkeypatch, env, trainer, kind):
    """Counts TRL's log-prob forward passes with the policy (old log-probs, or a PEFT reference)."""
    base = getattr(env.trl, f"{kind}Trainer")
    real = base._get_per_token_logps_and_entropies
    calls = []

    def spy(self, model, *a, **k):
        calls.append(model is self.model)
        return real(self, model, *a, **k)

    monkeypatch.setattr(base, "_get_per_token_logps_and_entropies", spy)
    return calls


def _trl_logps(env, trainer, kind, out):
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        base = getattr(env.trl, f"{kind}Trainer")
        logp, _, _ = base._get_per_token_logps_and_entropies(trainer, trainer.model, ids, att,
                                                            out["completion_ids"].shape[1])
    return logp


@pytest.mark.parametrize("kind,family,peft", [("GRPO", "llama", False), ("GRPO", "qwen2", True),
                                              ("RLOO", "llama", False), ("RLOO", "qwen2", True)])
def test_old_logps_are_the_engines(env, monkeypatch, kind, family, peft):
    """The engine generates; TRL's old-policy forward pass is skipped and its log-probs are the engine's, equal to
    TRL's recompute (through peft's forward of base + adapter, unmerged) to float32 rounding. With PEFT and
    beta != 0 TRL's reference pass (adapters off) still runs."""
    peft_config = None
    if peft:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = _trainer(env, kind, model=_model(env.tok, family), peft_config=peft_config, beta=0.05)
    if peft:  # B = 0 at init: make the adapters change the model
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    assert trainer.use_rlhf_fast_engine
    calls = _count_policy_passes(monkeypatch, env, trainer, kind)
    generate = []
    from transformers.generation.utils import GenerationMixin
    monkeypatch.setattr(GenerationMixin, "generate", lambda *a, **k: generate.append(1))
    out = trainer._generate_and_score_completions(_batch())
    assert not generate, "transformers' generate ran"
    assert calls.count(True) == (1 if peft else 0), calls  # the PEFT reference only; no old-policy pass
    mask = out["completion_mask"].bool()
    want = _trl_logps(env, trainer, kind, out)
    if kind == "GRPO":
        old = out["old_per_token_logps"]
        torch.testing.assert_close(old[mask], want[mask], rtol=0, atol=1e-5)
        assert (old[~mask] == 0).all()
    else:  # RLOO keeps each sequence's summed log-prob
        torch.testing.assert_close(out["old_logps"], (want * mask).sum(1), rtol=0, atol=1e-4)
    if peft:  # the adapters matter: the base model's log-probs differ (peft's own switch on its model)
        with trainer.model.disable_adapter():
            base = _trl_logps(env, trainer, kind, out)
        assert (base[mask] - want[mask]).abs().max() > 1e-2


def test_old_logps_pass_skipped_only_where_trl_runs_it(env, monkeypatch):
    """num_iterations == 1 (and steps aligned): TRL computes no old log-probs, and neither do we."""
    trainer = _trainer(env, num_iterations=1, beta=0.0)
    calls = _count_policy_passes(monkeypatch, env, trainer, "GRPO")
    out = trainer._generate_and_score_completions(_batch())
    assert "old_per_token_logps" not in out and not calls


def test_sampling_arguments_reach_the_engine(env):
    """temperature, top_k, top_p, max_completion_length, num_generations (n, shared prompt blocks) and TRL's stop
    tokens (tokenizer EOS + generation config's)."""
    trainer = _trainer(env, temperature=0.7, top_k=7, top_p=0.9, max_completion_length=6, num_generations=4,
                       generation_kwargs={"eos_token_id": [env.tok.eos_token_id, 5]})
    params = trainer._rf_params(4, cut=False)
    assert (params.temperature, params.top_k, params.top_p, params.max_new_tokens, params.n) == (0.7, 7, 0.9, 6, 4)
    assert set(params.stop_token_ids) == {env.tok.eos_token_id, 5}
    assert params.logprobs == "full"
    out = trainer._generate_and_score_completions(_batch(4))
    stats = trainer._rf_engine.stats
    assert stats.prompt_tokens == sum(len(env.tok(p)["input_ids"]) for p in PROMPTS[:2])  # each prompt once
    for row, m in zip(out["completion_ids"].tolist(), out["completion_mask"].tolist()):
        toks = row[:sum(m)]
        assert 1 <= len(toks) <= 6
        assert not set(toks[:-1]) & {env.tok.eos_token_id, 5}  # stops at the first stop token


def test_group():
    from rlhf_fast.integrations._trl_generate import group

    assert group([[1], [1], [2], [2]], 2) == ([[1], [2]], 2)
    assert group([[1], [1], [2], [3]], 2) == ([[1], [1], [2], [3]], 1)
    assert group([[1], [1], [1]], 2) == ([[1], [1], [1]], 1)


def test_top_k_top_p_logprobs_of_the_sampled_distribution(env, monkeypatch):
    """With top-k / top-p and our fused GRPO loss the engine's log-probs are the cut distribution's and the loss
    computes the same cut: at unchanged weights the ratio is 1 (no clipping) and the loss equals the loss with
    this step's own log-probs as the old ones."""
    from rlhf_fast import ops

    trainer = _trainer(env, top_k=5, top_p=0.85, temperature=0.9, beta=0.0)
    out = trainer._generate_and_score_completions(_batch())
    assert trainer._rf_cut == (5, 0.85)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    p, c = out["prompt_ids"].shape[1], out["completion_ids"].shape[1]
    with torch.no_grad():
        hidden = trainer.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
        w = trainer.model.get_output_embeddings().weight
        cut = ops.linear_token_logprobs(hidden[:, p - 1:p + c - 1], w, out["completion_ids"], temperature=0.9,
                                        top_k=5, top_p=0.85)
        full = ops.linear_token_logprobs(hidden[:, p - 1:p + c - 1], w, out["completion_ids"], temperature=0.9)
    mask = out["completion_mask"].bool()
    torch.testing.assert_close(out["old_per_token_logps"][mask], cut[mask], rtol=0, atol=1e-5)
    assert (cut[mask] - full[mask]).abs().max() > 1e-2  # the cut matters
    trainer.current_gradient_accumulation_steps = 1
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, out)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] == 0.0
    same = trainer._compute_loss(trainer.model, {k: v for k, v in out.items() if k != "old_per_token_logps"})
    torch.testing.assert_close(loss, same, rtol=1e-5, atol=1e-6)


def test_top_k_top_p_reference_uses_its_own_cut(env):
    """beta != 0 with top-k / top-p: the reference's log-probs are its own cut distribution's (as in our PPO), so at
    the initial weights (reference = policy) they equal the engine's and the logged KL is ~0."""
    trainer = _trainer(env, top_k=5, top_p=0.85, temperature=0.9, beta=0.05, use_bias_correction_kl=False)
    out = trainer._generate_and_score_completions(_batch())
    assert trainer._rf_cut == (5, 0.85)
    mask = out["completion_mask"].bool()
    torch.testing.assert_close(out["ref_per_token_logps"][mask], out["old_per_token_logps"][mask], rtol=0,
                               atol=1e-5)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    trainer._metrics["train"].clear()
    trainer._compute_loss(trainer.model, out)
    assert abs(trainer._metrics["train"]["kl"][-1]) < 1e-6


def test_trl_loss_on_the_engines_completions(env):
    """Given the engine's completions (and its old log-probs), TRL's `_compute_loss` and ours agree (no cut)."""
    trainer = _trainer(env, beta=0.05, use_bias_correction_kl=False, epsilon_high=0.28)
    out = trainer._generate_and_score_completions(_batch())
    trainer.current_gradient_accumulation_steps = 1
    theirs = env.trl.GRPOTrainer._compute_loss(trainer, trainer.model, out)
    ours = trainer._compute_loss(trainer.model, out)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("setting,value", [("min_p", 0.1), ("repetition_penalty", 1.2)])
def test_what_the_engine_cannot_sample_is_refused(env, monkeypatch, setting, value):
    with pytest.raises(ValueError, match=setting):
        _trainer(env, backend="rlhf_fast", **{setting: value})
    with pytest.warns(UserWarning, match=f"TRL's generate for {setting}"):
        trainer = _trainer(env, **{setting: value})
    assert not trainer.use_rlhf_fast_engine


def test_uncovered_model_falls_back_and_switch_returns_to_trl(env, monkeypatch):
    """A family the engine does not cover: "auto" warns once and generates with TRL's generate, "rlhf_fast"
    refuses; generation_backend="trl" generates with TRL's generate on a covered model."""
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        _trainer(env, model=_model(env.tok, "gptneox"), backend="rlhf_fast")
    with pytest.warns(UserWarning, match="GPTNeoXForCausalLM"):
        neox = _trainer(env, model=_model(env.tok, "gptneox"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trl_gen = _trainer(env, backend="trl")
    for trainer in (neox, trl_gen):
        assert not trainer.use_rlhf_fast_engine
        called = []
        real = type(trainer.model).generate
        monkeypatch.setattr(type(trainer.model), "generate", lambda *a, **k: called.append(1) or real(*a, **k))
        out = trainer._generate_and_score_completions(_batch())
        assert called and trainer._rf_engine is None
        assert out["completion_ids"].shape[0] == 4


def test_conversational_prompts(env, tmp_path):
    """Chat prompts: TRL renders and tokenizes them (its chat template path); the engine gets exactly those ids."""
    import datasets
    from datasets.table import InMemoryTable

    from rlhf_fast.default_task import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    chats = [[{"role": "user", "content": p.split(" : ")[1].removesuffix(" assistant")}] for p in PROMPTS[:2]]
    ds = datasets.Dataset(InMemoryTable.from_pydict({"prompt": chats * 2}), fingerprint="rlhf_fast-chat")
    trainer = env.plugin.GRPOTrainer(
        model=_model(tok), args=env.trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                                   num_generations=2, max_completion_length=6, use_cpu=True,
                                                   report_to="none", bf16=False, save_strategy="no"),
        train_dataset=ds, processing_class=tok, reward_funcs=lambda completions, **kw: [0.0] * len(completions))
    assert trainer.use_rlhf_fast_engine
    seen = []
    real = trainer._rf_generate
    trainer._rf_generate = lambda ids, n: seen.append([list(x) for x in ids]) or real(ids, n)
    batch = [{"prompt": c} for c in chats for _ in range(2)]
    out = trainer._generate_and_score_completions(batch)
    want = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"] for c in chats]
    assert seen == [[list(w) for w in want for _ in range(2)]]
    rows = [r[m.bool()].tolist() for r, m in zip(out["prompt_ids"], out["prompt_mask"])]
    assert rows == seen[0]


@pytest.mark.parametrize("kind", ["GRPO", "RLOO"])
def test_train_with_the_engine(env, kind, tmp_path):
    """TRL's `train()` with generation every 2 optimizer steps (steps_per_generation=2: TRL would recompute the
    old log-probs): it runs, generates with the engine, logs TRL's metrics and moves the weights."""
    from _tiny import one_thread

    trainer = _trainer(env, kind, steps_per_generation=2, num_iterations=1, max_steps=4, logging_steps=1,
                       learning_rate=0.05, optim="sgd", output_dir=str(tmp_path), beta=0.0)
    assert trainer.use_rlhf_fast_engine
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with one_thread():
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["loss"] == h["loss"] for h in logs)
    assert sum("reward" in h for h in logs) == 2  # generated at steps 1 and 3
    assert any((a != b).any() for a, b in zip(before, trainer.model.parameters()))


def test_stale_require_grads_hooks_are_dropped():
    """transformers adds an input-embedding hook at every gradient_checkpointing_enable and forgets the old one
    (removing none at disable for a plain model): `drop_stale_require_grads_hooks` keeps the one it still holds and
    any other hook on the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.integrations._trl_generate import drop_stale_require_grads_hooks

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    emb = model.get_input_embeddings()
    mine = emb.register_forward_hook(lambda mod, inp, out: None)
    for _ in range(3):
        on()
        off()
    on()
    assert len(emb._forward_hooks) == 1 + 4  # the leak this works around (if transformers fixes it, this fails)
    assert drop_stale_require_grads_hooks(model) == 3
    held = [h.id for h in model._require_grads_hooks]
    assert sorted(emb._forward_hooks) == sorted([mine.id, *held])
    assert drop_stale_require_grads_hooks(model) == 0
    out = emb(torch.tensor([[1, 2]]))
    assert out.requires_grad  # the kept hook still does its job


def test_training_keeps_one_embedding_hook(env, monkeypatch, tmp_path):
    """With gradient checkpointing on (TRL toggles it around every step's log-prob pass), each generation starts
    with one require-grads hook on the embedding, not one more per step: the eager forward stays as cheap and a
    compiled decode step is not recompiled at every step."""
    from _tiny import one_thread

    from rlhf_fast.rollout import RolloutEngine

    counts = []
    real = RolloutEngine.generate

    def spy(self, *a, **k):
        counts.append(sum(len(m._forward_hooks) for m in self.lm.modules()))
        return real(self, *a, **k)

    monkeypatch.setattr(RolloutEngine, "generate", spy)
    trainer = _trainer(env, "GRPO", num_iterations=1, max_steps=4, gradient_checkpointing=True,
                       output_dir=str(tmp_path), beta=0.0)
    assert trainer.use_rlhf_fast_engine
    with one_thread():
        trainer.train()
    assert len(counts) == 4 and counts == [counts[0]] * 4 and counts[0] <= 1, counts


def test_train_peft_with_the_engine_and_packed_loss(env, tmp_path):
    """A PEFT (LoRA) policy: the engine reads base + adapters unmerged, the packed loss's gradients reach the
    adapters and only them; TRL's reference (adapters off, beta != 0) runs as TRL's."""
    from _tiny import one_thread
    from peft import LoraConfig

    trainer = _trainer(env, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), beta=0.05,
                       max_steps=2, logging_steps=1, learning_rate=0.05, optim="sgd", output_dir=str(tmp_path))
    assert trainer.use_rlhf_fast_engine
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with one_thread():
        trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if (p != before[n]).any()}
    assert changed and all("lora_" in n for n in changed), changed
    assert all(h["loss"] == h["loss"] for h in trainer.state.log_history if "loss" in h)
