"""bench/memory_model.py's per-rank formulas against real models: the tensors it lists are the ones our models hold
(names and shapes: Llama untied and tied, Qwen3 with q/k norms and head_dim != hidden / heads, Qwen3-MoE's stacked
experts, a scalar-head model), one process's measured parameter, gradient and AdamW bytes equal the formula, its
FSDP chunking is torch.chunk's, its refusals are `parallelize.tensor_parallel`'s; and (slow) one torchrun launch of
bench_scaling's tp worker at dp 2 x tp 2 measures, rank by rank, what the formula predicts (an uneven FSDP split of
the reward model's head included)."""
import json
import types

import pytest
import torch

from bench import memory_model as mm
from bench.bench_scaling import TINY_ARCH, llama_config, tp_rows


def _qwen3(moe: bool):
    from transformers import Qwen3Config, Qwen3MoeConfig

    kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, tie_word_embeddings=False)
    if moe:
        return Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=2,
                              **kw), mm.Arch("moe", 96, 32, 2, 4, 2, head_dim=12, qk_norm=True, experts=6, top_k=2,
                                             moe_ffn=20)
    return Qwen3Config(intermediate_size=40, **kw), mm.Arch("qwen3", 96, 32, 2, 4, 2, 40, head_dim=12, qk_norm=True)


def _cases():
    tied = dict(TINY_ARCH, tied=True)
    return [(llama_config(TINY_ARCH), mm.Arch.from_bench(TINY_ARCH)), (llama_config(tied), mm.Arch.from_bench(tied)),
            _qwen3(False), _qwen3(True)]


@pytest.mark.parametrize("i", range(4))
def test_tensors_are_the_models_parameters(i):
    """Every parameter of the built model (and of a scalar-head model on its backbone), by name and shape."""
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models import build_model

    cfg, arch = _cases()[i]
    model = build_model(cfg, device="cpu")
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert got == {t.name: t.shape for t in mm.tensors(arch)}
    rm = ScalarHeadModel(build_model(cfg, lm_head=False, device="cpu"))
    got = {n.removeprefix("lm."): tuple(p.shape) for n, p in rm.named_parameters()}
    assert got == {t.name: t.shape for t in mm.tensors(arch, lm_head=False, scalar_head=True)}
    meta = build_model(mm.hf_config(arch), device="meta")  # what tp_refusal asks our code about
    assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == {t.name: t.shape for t in mm.tensors(arch)}


def test_one_process_bytes_after_an_adamw_step():
    """Parameter, gradient and AdamW moment / step-counter bytes of a real SFT step at world size 1 (read from the
    tensors) equal the formula's (tp 1, dp 1)."""
    from rlhf_fast.config import OptimConfig
    from rlhf_fast.models import build_model
    from rlhf_fast.stages.common import make_optimizer

    cfg, arch = _cases()[2]  # Qwen3: q/k norms, head_dim 12
    model = build_model(cfg, device="cpu")
    opt = make_optimizer(model.parameters(), OptimConfig(lr=1e-3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    want = 4 * mm.per_rank_elements(mm.tensors(arch), 1, 1)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items() if k != "step")
    steps = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
    assert (params, grads, moments, steps) == (want, want, 2 * want, 4 * len(mm.tensors(arch)))
    print(f"\n[memory model] one process, Qwen3-shaped tiny: measured params {params} B, grads {grads}, moments "
          f"{moments}, steps {steps}; formula {want} / {want} / {2 * want} / {4 * len(mm.tensors(arch))}")


def test_fsdp_chunks_are_torch_chunk_and_refusals_are_ours():
    from rlhf_fast import parallelize as par
    from rlhf_fast.config import ConfigError
    from rlhf_fast.models import build_model

    for d0, dp in ((1, 2), (7, 4), (32, 2), (5, 8), (129, 8)):
        sizes = [c.numel() for c in torch.chunk(torch.empty(d0), dp)] + [0] * dp
        assert [mm.local_numel(mm.Tensor("x", (d0, 3), None), 1, dp, r) for r in range(dp)] == \
            [3 * s for s in sizes[:dp]], (d0, dp)
    assert mm.local_numel(mm.Tensor("w", (8, 6), 1), 2, 2, 1) == 4 * 3  # tp splits dim 1, then FSDP dim 0
    for i, tp in ((0, 3), (3, 4)):  # a Llama at tp 3, the MoE (6 experts, 2 kv heads) at tp 4: refused
        cfg, arch = _cases()[i]
        with pytest.raises(ConfigError) as e:
            par.tensor_parallel(build_model(cfg, device="cpu"), types.SimpleNamespace(size=lambda: tp))
        assert mm.tp_refusal(arch, tp) == str(e.value) and "\n" not in str(e.value)
    assert mm.tp_refusal(mm.LLAMA3_70B, 8) == "" and mm.tp_refusal(mm.LLAMA3_70B, 1) == ""
    assert mm.tp_refusal(mm.QWEN3_30B_A3B, 8) == ""  # 4 kv heads at tp 8: replicated, one per rank (H6, 70df23c)
    assert "num_heads 32" in mm.tp_refusal(mm.QWEN3_30B_A3B, 3)
    row = mm.plan_row(mm.QWEN3_30B_A3B, mm.GRPO, 8, 1)
    assert row["runs_today"] == "yes" and not row["refused"]


def test_large_models_published_sizes_and_kv():
    """The shapes give the published parameter counts (Llama-3-70B 70.6B, Qwen3-30B-A3B 30.5B total) and the KV
    bytes per token per rank (70B at tp 8: one kv head of 128 per layer, K and V, bf16)."""
    assert round(mm.numel(mm.tensors(mm.LLAMA3_70B)) / 1e9, 2) == 70.55
    assert round(mm.numel(mm.tensors(mm.QWEN3_30B_A3B)) / 1e9, 1) == 30.5
    assert mm.kv_bytes_per_token(mm.LLAMA3_70B, 8) == 2 * 80 * 1 * 128 * 2
    assert mm.kv_bytes_per_token(mm.QWEN3_30B_A3B, 8) == 2 * 48 * 1 * 128 * 2  # a replicated kv head per rank
    with pytest.raises(mm.Refused, match="must divide the model's num_kv_heads 4"):
        mm.kv_bytes_per_token(mm.QWEN3_30B_A3B, 3)
    kv = [t for t in mm.tensors(mm.QWEN3_30B_A3B, tp=8) if t.name.endswith(("k_proj.weight", "v_proj.weight"))]
    assert kv and all(t.split is None for t in kv)  # whole on every tp rank at tp 8 (tensor_parallel replicates)
    row = mm.plan_row(mm.LLAMA3_70B, mm.GRPO, 8, 4)
    assert row["kv_GiB"] == 20.0 and row["runs_today"] == "yes"  # 64 x 8192 tokens x 40 KiB


@pytest.mark.slow
def test_formula_equals_torchrun_measurement_dp2_tp2(tmp_path):
    """One torchrun launch (4 ranks, gloo) of bench_scaling's tp worker on tests/_tp_worker.py's tiny Llama: every
    rank's parameter bytes (policy and reward model: its (1, 32) head sits on dp rank 0 only), gradient, AdamW and
    (when the engine runs under tp) KV bytes per token equal the formula's."""
    rows = tp_rows([(4, 2)], TINY_ARCH, "cpu", steps=1, seqs=8, length=16, timeout=600, tmp=tmp_path / "run")
    path = tmp_path / "scaling_tp_test.json"
    path.write_text(json.dumps({"rows": rows}))
    (res,) = mm.check_measured([path])
    assert res["equal"], res
    ranks = res["measured"]["rm_params_B_ranks"]
    assert ranks[0] == ranks[1] > ranks[2] == ranks[3], ranks  # the head's uneven FSDP split, measured
    assert res["measured"]["params_B_ranks"] == [19776] * 4  # the figure the tp tests measured (dp2 x tp2)


def test_recorded_measurements_equal_the_formula():
    """The per-rank bytes recorded in bench/results/scaling_tp*.json (the Llama's 5 layouts, the Qwen3-MoE's 4: whole
    experts per tp rank) still equal the formula rank by rank."""
    from bench.harness import RESULTS_DIR

    paths = sorted(RESULTS_DIR.glob("scaling_tp*.json"))
    assert {p.name for p in paths} >= {"scaling_tp.json", "scaling_tp_moe.json"}
    checks = mm.check_measured(paths, verbose=False)
    assert len(checks) >= 9 and all(c["equal"] for c in checks), [c for c in checks if not c["equal"]]
    assert any(json.loads(c["arch"]).get("experts") and "tp2" in c["case"] for c in checks)
