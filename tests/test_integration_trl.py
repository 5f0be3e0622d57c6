"""The TRL plug-in against TRL's own installed code (tests/_peers.py): `patch()` gives the same log-probs, entropy
and gradients as TRL's fused LM head (and falls back where it must), and our `GRPOTrainer._compute_loss` the same
loss and parameter gradients as `trl.GRPOTrainer._compute_loss` in every loss_type / ratio level / KL setting it
covers."""
import copy

import pytest
import torch

import _peers

V, H = 40, 32


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory):
    _peers.install("trl")
    import datasets
    import trl
    from datasets.table import InMemoryTable
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.default_task import build_tokenizer
    from rlhf_fast.integrations import trl as plugin

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
    return trl, plugin, trainer


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
            ref_loss, ref_grads = _loss_and_grads(lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x),
                                                  trainer, inputs)
            loss, grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, msg=str(case))
            assert len(grads) == len(ref_grads)
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=str(case))
        # no old log-probs (num_iterations == 1): TRL's ratio is exactly 1
        inputs = {k: v for k, v in base.items() if k != "old_per_token_logps"}
        for k, v in saved.items():
            setattr(trainer, k, v)
        ref_loss, ref_grads = _loss_and_grads(lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x), trainer,
                                              inputs)
        loss, grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


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
