"""Mixture-of-experts models under tensor parallelism (issue 23): `parallelize.tensor_parallel` splits a Qwen3-MoE
(a dense layer beside the MoE one, 24-wide experts: the grouped GEMM) and a Mixtral (18-wide experts: one GEMM per
expert, a sliding window) by experts: whole experts per tp rank (`gate_up_proj` / `down_proj` Shard(0) over tp), the
router replicated, the ranks' shares summed.

World 4 (dp 2 x tp 2: FSDP2 over dp of the tp-split experts; `WORLDS = (2, 4)` adds world 2, tp 2 alone), one
`torchrun --standalone` launch each of `tests/_tp_moe_worker.py` (CPU gloo, one thread per rank), against this process
at tp 1:

* the packed forward's hidden states and gathered logits equal one process's (1e-5), default and deterministic
  mode; the routes (every MoE layer's experts per token) are one process's, bit for bit, and the balance loss too;
  replaying them (`RoutingRecord.replay`, as the PPO passes do) gives the recorded forward's hidden states bitwise;
* the loss (summed log-probs + the balance loss) and every parameter's gradient equal one process's (1e-5 of each
  tensor's largest entry), Qwen3's q/k norms included; replicated parameters' gradients agree on every tp rank;
* the rollout engine's greedy and sampled completions: tokens and routes equal one process's and identical on every
  rank, log-probs within 1e-5;
* per-rank expert bytes 1/tp of one process's during the rollout and 1/(dp tp) at rest (printed: run with -s);
  state-dict names unchanged; DCP checkpoints across layouts: one process's read at tp 2 / dp 2 x tp 2 and theirs
  read here give the saved parameters and AdamW moments exactly;
* tp not dividing the number of experts: a one-line ConfigError.
"""
from __future__ import annotations

import types

import pytest
import torch

from tests import _tp_moe_worker as worker
from tests.test_distributed import in_one_process, rank_results, torchrun

TOL = 1e-5
WORLDS = (4,)  # dp 2 x tp 2 (tp 2 with FSDP2 over dp on top); (2, 4) adds the tp-only layout (+ ~30 s)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(one-process results, {world: [rank results]}, output dir)."""
    out = tmp_path_factory.mktemp("tp_moe")
    one = in_one_process(worker.run, out)  # writes the world-1 checkpoints the launches read
    runs = {}
    for w in WORLDS:
        torchrun("tests._tp_moe_worker", str(out), nproc=w, timeout=600)
        runs[w] = rank_results(out, f"w{w}", w)
    return one, runs, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_forward_and_routes(worlds, world, kind):
    one, runs, _ = worlds
    for r in runs[world]:
        assert (r["tp_size"], r["dp_size"]) == (2, world // 2)
        for mode in ("default", "det"):
            got, ref = r[kind][mode], one[kind][mode]
            assert float((got["hidden"] - ref["hidden"]).abs().max()) < TOL, (r["rank"], mode)
            assert float((got["logits"] - ref["logits"]).abs().max()) < TOL, (r["rank"], mode)
            assert got["routes"].shape[0] >= 1 and torch.equal(got["routes"], ref["routes"]), (r["rank"], mode)
            assert abs(float(got["balance"] - ref["balance"])) < 1e-6
            assert got["replay_equal"] and got["replay_flips"] == 0.0, (r["rank"], mode)  # replay = record, bitwise
            first = runs[world][r["rank"] - r["rank"] % 2][kind][mode]  # hidden states replicated over the tp group
            assert torch.equal(got["hidden"], first["hidden"]) and torch.equal(got["logits"], first["logits"])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_loss_and_gradients(worlds, world, kind):
    one, runs, _ = worlds
    ranks = runs[world]
    for r in ranks:
        for mode in ("default", "det"):
            got, ref = r[kind][mode], one[kind][mode]
            assert abs(float(got["loss"] - ref["loss"])) <= TOL * abs(float(ref["loss"])), (r["rank"], mode)
            assert got["grads"].keys() == ref["grads"].keys()
            bad = {n: rel(got["grads"][n], g) for n, g in ref["grads"].items() if rel(got["grads"][n], g) > TOL}
            assert not bad, (r["rank"], mode, bad)
            assert any("q_norm" in n for n in ref["grads"]) == (kind == "qwen3_moe")
            for n, g in got["grads"].items():  # every rank holds the same (whole) gradient
                assert torch.equal(g, ranks[0][kind][mode]["grads"][n]), (r["rank"], n)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_engine_tokens_and_routes(worlds, world, kind):
    one, runs, _ = worlds
    for name in ("greedy", "sampled"):
        ref = one[kind][name]
        for r in runs[world]:
            got = r[kind][name]
            assert len(got) == len(ref)
            for g, o, first in zip(got, ref, runs[world][0][kind][name]):
                assert g["prompt"] == o["prompt"] and g["tokens"] == o["tokens"], (r["rank"], name)
                assert g["routes"].dtype == torch.int16 and torch.equal(g["routes"], o["routes"]), (r["rank"], name)
                assert torch.equal(g["routes"], first["routes"]) and torch.equal(g["logprobs"], first["logprobs"])
                assert float((g["logprobs"] - o["logprobs"]).abs().max()) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_expert_bytes_per_rank(worlds, world, kind):
    one, runs, _ = worlds
    whole = one[kind]["bytes_rest"]
    for r in runs[world]:
        rest, roll = r[kind]["bytes_rest"], r[kind]["bytes_rollout"]
        print(f"{kind} world {world} rank {r['rank']} (dp {r['dp_rank']}/{r['dp_size']}, tp {r['tp_size']}): experts "
              f"at rest {rest['experts']} B, in the rollout {roll['experts']} B, one process {whole['experts']} B; "
              f"other parameters at rest {rest['other']} B, in the rollout {roll['other']} B, one process "
              f"{whole['other']} B")
        assert roll["experts"] * 2 == whole["experts"]
        assert rest["experts"] * world == whole["experts"]
        assert r[kind]["names"] == one[kind]["names"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_checkpoints_across_layouts(worlds, world, kind):
    """One process's DCP checkpoint read at tp 2 (and dp 2 x tp 2) gives its parameters and AdamW moments bit for
    bit; theirs read here gives theirs."""
    from rlhf_fast import checkpoint

    one, runs, out = worlds
    for r in runs[world]:
        for n, p in one[kind]["stepped"].items():
            assert torch.equal(r[kind]["loaded_from_1"][n], p), n
            assert torch.equal(r[kind]["loaded_from_1_moments"][n], one[kind]["moments"][n]), n
    model = worker.tiny_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoint.read_models(out / f"ckpt_{kind}_w{world}", {"policy": model}, opt)
    saved = runs[world][0][kind]
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved["stepped"][n]), n
        assert torch.equal(opt.state[p]["exp_avg"], saved["moments"][n]), n
        assert rel(p.detach(), one[kind]["stepped"][n]) < 1e-3  # the same step within rounding (AdamW's sign)


def test_refuses_experts_not_divisible():
    import transformers as tf

    from rlhf_fast import parallelize as par
    from rlhf_fast.config import ConfigError
    from rlhf_fast.models import build_model

    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=6, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match=r"^parallel.tp: 4 must divide the model's num_experts 6$"):
        par.tensor_parallel(build_model(cfg, device="cpu"), types.SimpleNamespace(size=lambda: 4))
    assert par._check_tp(build_model(cfg, device="cpu"), 2) is not None  # 2 divides 6
