"""The TRL plug-in against TRL's own installed code (tests/_peers.py): `patch()` gives the same log-probs, entropy
and gradients as TRL's fused LM head (and falls back where it must), and our `GRPOTrainer._compute_loss` the same
loss and parameter gradients as `trl.GRPOTrainer._compute_loss` in every loss_type / ratio level / KL setting it
covers."""
import copy

import pytest
import torch

import _peers
from _tiny import one_thread

V, H = 40, 32


@pytest.fixture(scope="module", params=_peers.versions("trl"))
def trl_env(request, tmp_path_factory):
    with _peers.plugin("trl", request.param) as plugin:
        import datasets
        import trl
        from datasets.table import InMemoryTable
        from transformers import LlamaConfig, LlamaForCausalLM

        from rlhf_fast.default_task import build_tokenizer

        root = tmp_path_factory.mktemp("trl")
        tok = build_tokenizer(root / "tok")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             pad_token_id=tok.pad_token_id))
        # an explicit fingerprint: datasets' table hashing fails on this pyarrow (unrelated to what is tested)
        ds = datasets.Dataset(InMemoryTable.from_pydict({"prompt": ["user : reverse a b assistant :"] * 4}),
                              fingerprint="rlhf_fast-test")
        args = trl.GRPOConfig(output_dir=str(root / "out"), per_device_train_batch_size=4, num_generations=2,
                              max_completion_length=9, use_cpu=True, report_to="none", temperature=0.8, bf16=False,
                              use_bias_correction_kl=False)  # True (the default) with beta != 0: TRL's own code
        trainer = plugin.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                     args=args, train_dataset=ds, processing_class=tok)
        trainer.current_gradient_accumulation_steps = 2  # set by the training loop
        yield trl, plugin, trainer


def _inputs(vocab, seed=0, b=4, p=5, c=7):
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    comp_mask = torch.ones(b, c, dtype=torch.long)
    comp_mask[1, 4:] = 0  # right padding
    comp_mask[2, 1:] = 0
    return {"prompt_ids": torch.randint(3, vocab, (b, p), generator=g), "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(3, vocab, (b, c), generator=g), "completion_mask": comp_mask,
            "advantages": torch.randn(b, generator=g), "num_items_in_batch": comp_mask.sum() * 2.0,
            "noise": 0.3 * torch.randn(b, c, generator=g), "ref_noise": 0.3 * torch.randn(b, c, generator=g),
            "is_ratio": 0.5 + torch.rand(b, c, generator=g)}


def _loss_and_grads(fn, trainer, inputs):
    trainer.model.zero_grad()
    loss = fn(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def _step(fn, trainer, inputs):
    """(loss, grads, {metric: the value this call logged})."""
    trainer._metrics["train"].clear()
    loss, grads = _loss_and_grads(fn, trainer, inputs)
    return loss, grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _trl_step(trl, trainer, inputs):
    return _step(lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x), trainer, inputs)


def _assert_same(ours, theirs, where):
    """Same loss, gradients and (under TRL's keys) logged metrics; ours may add only `entropy/seq_mean` and
    `kl/seq_mean`, and only for loss_type grpo."""
    (loss, grads, m), (ref_loss, ref_grads, ref_m) = ours, theirs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, msg=where)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=where)
    assert set(ref_m) <= set(m), (where, set(ref_m) - set(m))
    assert set(m) - set(ref_m) <= {"entropy/seq_mean", "kl/seq_mean"}, where
    for k in ref_m:
        assert m[k] == pytest.approx(ref_m[k], rel=1e-5, abs=1e-6), (where, k, m[k], ref_m[k])


def _with_logps(trainer, inputs):
    """Old and reference log-probs near the current ones (so the ratio clips on both sides)."""
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        cur, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att,
                                                               inputs["completion_ids"].shape[1])
    return {**inputs, "old_per_token_logps": cur + inputs["noise"], "ref_per_token_logps": cur + inputs["ref_noise"]}


def test_grpo_trainer_loss_matches_trl(trl_env):
    trl, plugin, trainer = trl_env
    base = _with_logps(trainer, _inputs(trainer.model.config.vocab_size))
    saved = {k: getattr(trainer, k) for k in ("loss_type", "importance_sampling_level", "beta", "use_vllm",
                                              "vllm_importance_sampling_correction")}
    cases = [dict(loss_type=lt, importance_sampling_level=lvl, beta=beta)
             for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for lvl in ("token", "sequence") for beta in (0.0, 0.05)]
    cases.append(dict(loss_type="dapo", importance_sampling_level="token", beta=0.05, use_vllm=True,
                      vllm_importance_sampling_correction=True))
    try:
        for case in cases:
            for k, v in case.items():
                setattr(trainer, k, v)
            inputs = {**base, "importance_sampling_ratio": base["is_ratio"]}
            assert plugin.fallback_reason(trainer, inputs) is None, case
            theirs = _trl_step(trl, trainer, inputs)
            ours = _step(trainer._compute_loss, trainer, inputs)
            _assert_same(ours, theirs, str(case))
            assert {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/low_min", "clip_ratio/high_max",
                    "clip_ratio/region_mean", "entropy"} <= set(ours[2]), case
            assert ("kl" in ours[2]) == (case["beta"] != 0.0)
            assert ("entropy/seq_mean" in ours[2]) == (case["loss_type"] == "grpo")
        # the clip fractions are not all zero: the cases above compare something
        assert theirs[2]["clip_ratio/low_mean"] > 0 and theirs[2]["clip_ratio/high_mean"] > 0
        # no old log-probs (num_iterations == 1): TRL's ratio is exactly 1
        inputs = {k: v for k, v in base.items() if k != "old_per_token_logps"}
        for k, v in saved.items():
            setattr(trainer, k, v)
        _assert_same(_step(trainer._compute_loss, trainer, inputs), _trl_step(trl, trainer, inputs), "no old")
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


def test_grpo_seq_means_and_tool_mask(trl_env, monkeypatch):
    """`entropy/seq_mean` and `kl/seq_mean` (loss_type grpo) are the means over non-empty sequences of their token
    means, from TRL's own per-token entropies; a `tool_mask` masks every metric as it masks TRL's."""
    trl, plugin, trainer = trl_env
    monkeypatch.setattr(trainer, "loss_type", "grpo")
    monkeypatch.setattr(trainer, "beta", 0.05)
    inputs = _with_logps(trainer, _inputs(trainer.model.config.vocab_size, seed=4))
    tool = torch.ones_like(inputs["completion_mask"])
    tool[0, 2:5] = 0
    tool[3, :] = 0  # a row the tool mask empties
    inputs = {**inputs, "tool_mask": tool}
    ours = _step(trainer._compute_loss, trainer, inputs)
    _assert_same(ours, _trl_step(trl, trainer, inputs), "tool_mask")
    mask = (inputs["completion_mask"] * tool).bool()
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, ids.shape[1] - 5,
                                                                  compute_entropy=True)
    d = inputs["ref_per_token_logps"] - logp
    rows = mask.any(-1)
    for key, x in (("entropy/seq_mean", ent), ("kl/seq_mean", torch.exp(d) - d - 1)):
        per_row = (x * mask).sum(-1)[rows] / mask.sum(-1)[rows]
        assert ours[2][key] == pytest.approx(per_row.mean().item(), rel=1e-5), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_at_masked_positions(trl_env, monkeypatch, bad):
    """NaN / Inf where the mask is 0, in the old log-probs, the reference log-probs or the (B, T) advantages: our
    loss, gradients and every metric equal TRL's on the same inputs with finite values there (TRL's own give NaN)."""
    trl, plugin, trainer = trl_env
    monkeypatch.setattr(trainer, "beta", 0.05)
    clean = _with_logps(trainer, _inputs(trainer.model.config.vocab_size, seed=5))
    off = clean["completion_mask"] == 0
    # (B, T) advantages at the token level; TRL's (B,) at the sequence level (a subclass's (B, T) falls back to
    # TRL there: its gradient differentiates the sequence mean, which GSPO's stop-gradient form equals only then)
    noise = 0.5 * torch.randn(off.shape, generator=torch.Generator().manual_seed(6))
    advantages = {"token": clean["advantages"][:, None] + noise, "sequence": clean["advantages"]}
    for lt, lvl in (("grpo", "token"), ("grpo", "sequence"), ("dapo", "token")):
        clean = {**clean, "advantages": advantages[lvl]}
        monkeypatch.setattr(trainer, "loss_type", lt)
        monkeypatch.setattr(trainer, "importance_sampling_level", lvl)
        theirs = _trl_step(trl, trainer, clean)
        for key in ("old_per_token_logps", "ref_per_token_logps", "advantages")[:3 if lvl == "token" else 2]:
            dirty = {**clean, key: clean[key].masked_fill(off, bad)}
            ours = _step(trainer._compute_loss, trainer, dirty)
            assert all(v == v for v in ours[2].values()), (lt, lvl, key, ours[2])
            _assert_same(ours, theirs, f"{lt} {lvl} {key}={bad}")


def test_packed_forward_against_trl(trl_env, monkeypatch):
    """The loss's forward is our packed one (each group's prompt once, no padding): same loss, gradients and
    metrics as TRL's own `_compute_loss`, with groups sharing a prompt; `packed_forward=False` runs HF's."""
    from rlhf_fast.models import packed

    trl, plugin, trainer = trl_env
    monkeypatch.setattr(trainer, "beta", 0.05)
    inputs = _inputs(trainer.model.config.vocab_size, seed=7)
    for k in ("prompt_ids", "prompt_mask"):  # rows 0-1 and 2-3 share a prompt (TRL's num_generations)
        inputs[k] = inputs[k][[0, 0, 2, 2]]
    inputs = _with_logps(trainer, inputs)
    calls = []
    real = packed.packed_hidden
    monkeypatch.setattr(packed, "packed_hidden", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    theirs = _trl_step(trl, trainer, inputs)
    _assert_same(_step(trainer._compute_loss, trainer, inputs), theirs, "packed")
    assert len(calls) == 1 and calls[0].num_tokens < int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
    monkeypatch.setattr(trainer, "packed_forward", False)
    _assert_same(_step(trainer._compute_loss, trainer, inputs), theirs, "hf forward")
    assert len(calls) == 1


def test_gradient_checkpointing_in_packed_forward(trl_env, monkeypatch):
    """With the model's own gradient checkpointing on (TRL's default), the loss still runs our packed forward, each
    decoder block checkpointed as HF checkpoints each decoder layer: the loss, gradients and metrics equal TRL's, the
    forward keeps fewer activations for the backward than without checkpointing (saved-tensor bytes), every block is
    recomputed in the backward, and the decoder's blocks are its own again afterwards."""
    from torch.utils import checkpoint as torch_checkpoint

    from rlhf_fast.integrations import trl as rf_trl
    from rlhf_fast.models import as_decoder

    trl, plugin, trainer = trl_env
    model = trainer.model
    inputs = _with_logps(trainer, _inputs(model.config.vocab_size, seed=3))
    for k in ("prompt_ids", "prompt_mask"):  # groups sharing a prompt, as TRL batches them
        inputs[k] = inputs[k][[0, 0, 2, 2]]
    decoder = as_decoder(model)
    blocks = list(decoder.layers)

    def saved_bytes():  # what the forward keeps for the backward
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = rf_trl.packed_completion_hidden(trainer, model, inputs)
        assert h is not None
        return sum(sizes)

    plain = saved_bytes()
    on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    on()
    try:
        assert saved_bytes() < plain
        calls = []
        real = torch_checkpoint.checkpoint
        monkeypatch.setattr(torch_checkpoint, "checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
        _assert_same(_step(trainer._compute_loss, trainer, inputs), _trl_step(trl, trainer, inputs), "checkpointing")
        assert calls[-len(blocks):] == blocks  # our step's blocks, each checkpointed once
        with torch.no_grad():  # nothing to recompute without gradients (HF's rule too)
            calls.clear()
            rf_trl.packed_completion_hidden(trainer, model, inputs)
            assert not calls
    finally:
        off()
    assert list(decoder.layers) == blocks


def test_grpo_trainer_falls_back_to_trl(trl_env, monkeypatch):
    trl, plugin, trainer = trl_env
    inputs = _with_logps(trainer, _inputs(trainer.model.config.vocab_size, seed=1))
    monkeypatch.setattr(trainer, "loss_type", "cispo")
    assert plugin.fallback_reason(trainer, inputs) == "loss_type='cispo'"
    called = []
    monkeypatch.setattr(plugin, "fused_grpo_loss", lambda *a: called.append(1))
    ref_loss, _ = _loss_and_grads(lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x), trainer, inputs)
    loss, _ = _loss_and_grads(trainer._compute_loss, trainer, inputs)
    assert not called
    torch.testing.assert_close(loss, ref_loss)
    # per-token advantages at the sequence level: TRL's gradient (of the sequence mean) is not GSPO's
    monkeypatch.setattr(trainer, "loss_type", "grpo")
    monkeypatch.setattr(trainer, "importance_sampling_level", "sequence")
    inputs = {**inputs, "advantages": torch.randn(inputs["completion_mask"].shape)}
    assert plugin.fallback_reason(trainer, inputs) == "per-token advantages with importance_sampling_level='sequence'"
    _assert_same(_step(trainer._compute_loss, trainer, inputs), _trl_step(trl, trainer, inputs), "fallback")
    assert not called


def test_patch_routes_trl_fused_lm_head(trl_env, monkeypatch):
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from rlhf_fast import ops

    _, plugin, trainer = trl_env
    original = trl_utils._ChunkedLogProbFunction
    base = trainer.accelerator.unwrap_model(trainer.model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, base.config.vocab_size, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    gl, ge = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)

    def run(outputs):
        model = copy.deepcopy(base)
        add_fused_lm_head(model, temperature=0.7, outputs=outputs)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        ((out.log_probs * gl).sum() + (out.entropy * ge).sum()).backward()
        return out, [p.grad for p in model.parameters() if p.grad is not None]

    ref, ref_grads = run(("log_probs", "entropy"))
    calls = []
    real = ops.linear_token_logprobs
    monkeypatch.setattr(ops, "linear_token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    plugin.patch()
    try:
        assert trl_utils._ChunkedLogProbFunction is plugin.LinearLogprobFunction
        full, _ = run(("log_probs", "entropy", "is_top1"))  # is_top1 (SFT, DPO): TRL's own kernel
        assert not calls and full.is_top1 is not None
        torch.testing.assert_close(full.log_probs, ref.log_probs)
        ours, grads = run(("log_probs", "entropy"))  # GRPO / RLOO: ours
        assert calls, "ops.linear_token_logprobs was not called"
    finally:
        plugin.unpatch()
    assert trl_utils._ChunkedLogProbFunction is original
    assert ours.is_top1 is None
    torch.testing.assert_close(ours.log_probs, ref.log_probs, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours.entropy, ref.entropy, rtol=1e-5, atol=2e-6)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_logs_trl_metrics(trl_env, tmp_path):
    """Two optimizer steps of `trainer.train()` (generation, rewards, old/reference log-probs, loss, optimizer, the
    logger), once with TRL's GRPOTrainer and once with ours (TRL's generate), from the same weights and seed: every
    value TRL logs,
    ours logs under the same key and within rounding; ours adds only `entropy/seq_mean` and `kl/seq_mean`."""
    trl, plugin, trainer = trl_env
    init = tmp_path / "init"  # TRL loads its reference model (beta != 0) from the policy's path
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(init)
    histories = []
    for cls in (trl.GRPOTrainer, plugin.GRPOTrainer):
        args = trl.GRPOConfig(output_dir=str(tmp_path / cls.__module__), per_device_train_batch_size=4,
                              num_generations=2, max_completion_length=9, use_cpu=True, report_to="none",
                              temperature=0.8, bf16=False, beta=0.05, use_bias_correction_kl=False, epsilon_high=0.28,
                              num_iterations=2, max_steps=2, logging_steps=1, seed=3, optim="sgd", learning_rate=2.0,
                              save_strategy="no", loss_type="grpo")
        same_generate = {} if cls is trl.GRPOTrainer else {"generation_backend": "trl"}  # the same completions
        run = cls(model=str(init), args=args, train_dataset=trainer.train_dataset,
                  processing_class=trainer.processing_class,
                  reward_funcs=lambda completions, **kw: [float(len(c) % 3) for c in completions], **same_generate)
        run.train()
        histories.append([h for h in run.state.log_history if "loss" in h])
    theirs, ours = histories
    assert len(theirs) == len(ours) == 2
    clipped = 0.0
    for t, o in zip(theirs, ours):
        assert set(o) - set(t) == {"entropy/seq_mean", "kl/seq_mean"}, set(o) ^ set(t)
        for k, v in t.items():
            if isinstance(v, float) and k not in ("step_time",):
                assert o[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (k, o[k], v)
        clipped += t["clip_ratio/region_mean"]
    assert clipped > 0, "no token was clipped: the clip metrics compared nothing"


def test_training_with_the_engine_against_trls_generate(trl_env, tmp_path):
    """Ten optimizer steps of `trainer.train()` from the same weights, generating with TRL's generate
    (`trl.GRPOTrainer`) and with RolloutEngine (ours, "auto"). The completions differ (another RNG), so this
    compares what must agree: at each generation step the weights are those that generated, so the ratio is 1 (no
    clipped token) and, at the first, the KL to the reference (the same weights) is ~0 on both; the engine's old
    log-probs stand in for TRL's forward pass (num_iterations=2); and both reward curves rise."""
    import datasets
    from datasets.table import InMemoryTable
    from transformers import LlamaConfig, LlamaForCausalLM

    trl, plugin, trainer = trl_env
    tok = trainer.processing_class
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "init")
    ds = datasets.Dataset(InMemoryTable.from_pydict(
        {"prompt": ["user : reverse a b assistant :", "user : reverse c assistant :"] * 16}), fingerprint="rf-trend")
    rewards = {}
    for cls in (trl.GRPOTrainer, plugin.GRPOTrainer):
        args = trl.GRPOConfig(output_dir=str(tmp_path / cls.__module__), per_device_train_batch_size=8,
                              num_generations=4, max_completion_length=8, use_cpu=True, report_to="none",
                              temperature=1.0, bf16=False, num_iterations=2, beta=0.05, use_bias_correction_kl=False,
                              max_steps=10, logging_steps=1, save_strategy="no", seed=3, optim="adamw_torch",
                              learning_rate=0.03)
        run = cls(model=str(tmp_path / "init"), args=args, train_dataset=ds, processing_class=tok,
                  reward_funcs=lambda completions, **kw: [c.split().count("a") / 8 for c in completions])
        assert getattr(run, "use_rlhf_fast_engine", False) == (cls is plugin.GRPOTrainer)
        with one_thread():
            run.train()
        logs = [h for h in run.state.log_history if "loss" in h]
        generated = [h for h in logs if "reward" in h]  # the steps that generated (every num_iterations)
        assert len(generated) == 5
        assert abs(generated[0]["kl"]) < 1e-6, cls
        assert all(h["clip_ratio/region_mean"] == 0.0 for h in generated), cls
        rewards[cls] = [h["reward"] for h in generated]
    for cls, r in rewards.items():
        assert r[-1] > r[0] and sum(r[-2:]) > sum(r[:2]), (cls, r)


def test_tested_release_is_declared(trl_env):
    _peers.assert_declared(trl_env[1], "trl")


def test_other_releases_are_refused(trl_env, monkeypatch):
    """On a TRL release outside SUPPORTED_VERSIONS (the version the check reads is patched, TRL's code is not),
    patch() and our GRPOTrainer raise, naming both; the override lets them run."""
    _, plugin, _ = trl_env

    def patch_and_undo():
        plugin.patch()
        plugin.unpatch()

    def trainer_class():
        monkeypatch.delitem(plugin.__dict__, "GRPOTrainer", raising=False)
        return plugin.GRPOTrainer

    _peers.assert_refuses(monkeypatch, plugin, "trl", patch_and_undo, trainer_class)
