"""`rlhf_fast.parallelize`: checkpointing, compile and FSDP2 applied from outside the model.

At world size 1 (this process): sharding is a no-op, checkpointing keeps the state-dict names and the numbers,
compile gives the same forward. At world size 2 (one `torchrun --standalone --nproc_per_node 2` launch of
`tests/_parallelize_worker.py`, CPU gloo, one thread per rank) against this process: a packed forward + backward with
sharding, sharding + checkpointing (+ compile, eager backend), and a root holding a backbone and a head gives the
one-process loss and gradients; `unsharded` runs no collective while ranks decode unevenly; DCP checkpoints of a
sharded, checkpointed model load at world size 1 into a plain model.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import distributed as dist
from rlhf_fast import parallelize as par
from tests import _parallelize_worker as worker

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-6  # fp32 rounding: the ranks' partial gradients are summed in another order


def max_rel(a: dict, b: dict) -> float:
    """Largest over tensors of max |a - b| / max |b|."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def torchrun(out: Path) -> None:
    """`tests._parallelize_worker out` on 2 ranks (`torchrun --standalone`), one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests._parallelize_worker", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


@pytest.fixture(autouse=True)
def _eager_compile(monkeypatch):
    """Inductor needs ~40 s per block graph on 2 cores: the compile=True specs here trace with dynamo and run eager
    (`test_compile_inductor_same_forward` checks inductor itself)."""
    monkeypatch.setattr(par, "COMPILE_BACKEND", "eager")


def _packed(items):
    from rlhf_fast.models.packed import pack

    return pack([p for p, _ in items], [r for _, r in items])


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    loss = worker.step(model)
    return loss, worker.full_grads(model)


# --- world size 1 ----------------------------------------------------------------------------------------------


def test_world_size_one_shards_nothing():
    model = worker.tiny_model()
    assert par.parallelize(model, shard=True, mixed_precision=True) is model
    assert par.fsdp_modules(model) == [] and not dist.is_sharded(model)
    with par.unsharded(model, None):
        pass
    (l1, g1), (l2, g2) = _loss_and_grads(model), _loss_and_grads(worker.tiny_model())
    assert l1 == l2 and all(torch.equal(g1[k], g2[k]) for k in g2)


def test_spec_and_misuse():
    assert par.ParallelSpec() == par.ParallelSpec(shard=True, checkpointing=False, compile=False,
                                                  mixed_precision=False, reshard_after_forward=True)
    with pytest.raises(TypeError, match="bool"):
        par.ParallelSpec(checkpointing=1)
    with pytest.raises(TypeError, match="not both"):
        par.parallelize(worker.tiny_model(), par.ParallelSpec(), checkpointing=True)
    with pytest.raises(TypeError, match="layers"):
        par.parallelize(torch.nn.Linear(2, 2), checkpointing=True)
    model = par.parallelize(worker.tiny_model(), checkpointing=True)
    with pytest.raises(ValueError, match="already parallelized"):
        par.parallelize(model, checkpointing=True)


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt2", "head"])
def test_checkpointing_keeps_names_and_numbers(kind):
    """State-dict keys and values unchanged, a plain state dict loads into the wrapped model, and the forward +
    backward is bitwise the plain one (the recomputation repeats the same ops)."""
    plain, wrapped = worker.tiny_model(kind), par.parallelize(worker.tiny_model(kind), checkpointing=True)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    assert all(isinstance(b, CheckpointWrapper) for b in par.blocks(wrapped))
    sd = plain.state_dict()
    assert list(wrapped.state_dict()) == list(sd)
    assert all(torch.equal(v, sd[k]) for k, v in wrapped.state_dict().items())
    wrapped.load_state_dict(sd)
    (l1, g1), (l2, g2) = _loss_and_grads(plain), _loss_and_grads(wrapped)
    assert l1 == l2 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


def test_dcp_round_trip_with_checkpointing(tmp_path):
    """save_state / load_state on a checkpointed model use the plain names: it loads into a plain model, and back."""
    wrapped = par.parallelize(worker.tiny_model(), checkpointing=True)
    with torch.no_grad():
        for p in wrapped.parameters():
            p.add_(0.5)
    dist.save_state(tmp_path / "a", {"model": wrapped}, None)
    plain = worker.tiny_model()
    dist.load_state(tmp_path / "a", {"model": plain}, None)
    assert max_rel(plain.state_dict(), wrapped.state_dict()) == 0.0
    dist.save_state(tmp_path / "b", {"model": plain}, None)
    again = par.parallelize(worker.tiny_model(), checkpointing=True)
    dist.load_state(tmp_path / "b", {"model": again}, None)
    assert max_rel(again.state_dict(), plain.state_dict()) == 0.0


def test_compile_keeps_names_and_forward():
    """compile=True (dynamo here, eager backend) compiles each block in place: same names, same forward."""
    ref, model = worker.tiny_model(), par.parallelize(worker.tiny_model(), compile=True, checkpointing=True)
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = _packed(worker.global_batch())
    with torch.no_grad():
        assert torch.equal(worker.hidden(model, batch), worker.hidden(ref, batch))


def test_compiled_blocks_are_not_recompiled_per_batch_layout():
    """The packed attention plan is a compile boundary (`torch.compiler.disable`): batches of new layouts (other
    lengths, other prompt sharing) reuse each block's graphs instead of compiling again."""
    from torch._dynamo.utils import counters

    from rlhf_fast.models.packed import pack

    torch._dynamo.reset()
    model = par.parallelize(worker.tiny_model(), compile=True)
    g = torch.Generator().manual_seed(0)
    seen = []
    for lengths in ((3, 5), (4, 4, 2), (7,), (2, 6, 3, 5), (5, 1)):
        prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in lengths]
        responses = [torch.randint(3, 60, (n + 1,), generator=g).tolist() for n in lengths]
        with torch.no_grad():
            worker.hidden(model, pack(prompts, responses, groups=[0] * len(lengths) if len(set(map(tuple, prompts)))
                                      == 1 else None))
        seen.append(counters["stats"]["unique_graphs"])
    assert seen[1] == seen[-1], seen  # graphs after the second batch (its first dynamic shapes): no new ones


@pytest.mark.slow
def test_compile_inductor_same_forward(monkeypatch):
    """The inductor backend (the default) on a tiny model: the forward within fp32 rounding (its fused kernels
    round differently), names unchanged. ~40 s on 2 CPU cores."""
    monkeypatch.setattr(par, "COMPILE_BACKEND", "inductor")
    ref, model = worker.tiny_model(), par.parallelize(worker.tiny_model(), compile=True)
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = _packed(worker.global_batch())
    with torch.no_grad():
        got, want = worker.hidden(model, batch), worker.hidden(ref, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- world size 2 against 1 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(world-size-1 results, [rank 0, rank 1] results, output dir)."""
    out = tmp_path_factory.mktemp("parallelize")
    n = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setattr(par, "COMPILE_BACKEND", "eager")
    try:
        one = worker.run(out)
        torchrun(out)
    finally:
        torch.set_num_threads(n)
        mp.undo()
    two = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return one, two, out


@pytest.mark.parametrize("name", list(worker.SPECS))
def test_two_ranks_match_one_process(worlds, name):
    """Loss and every parameter's gradient of the sharded packed forward + backward (micro-batched, the fused
    log-prob op on `lm_head.weight` after the root forward) equal the one-process ones within fp32 rounding; after
    `unsharded` was used (decoding; with shard_ckpt: entered before any forward, then nested, ranks unevenly)."""
    one, two, _ = worlds
    a, b = one[name], two[0][name]
    assert two[1][name]["loss"] == b["loss"]  # every rank has the same global loss
    assert abs(a["loss"] - b["loss"]) <= REL * abs(a["loss"])
    assert a["grads"].keys() == b["grads"].keys()
    assert max_rel(b["grads"], a["grads"]) < REL, max_rel(b["grads"], a["grads"])


def test_unsharded_runs_no_collective(worlds):
    """Inside `unsharded`, rank 0 runs 3 forwards and rank 1 one, then the rollout engine decodes 4 tokens per prompt
    on rank 0 and 14 on rank 1 (a collective would hang: the process group times out after 60 s). The FSDP hooks
    fire, no collective runs, the parameters are sharded again after; the tokens are the one-process ones."""
    one, two, _ = worlds
    layers = worker.tiny_model().num_layers
    for r, d in enumerate(two):
        dec = d["decode"]
        assert dec["collectives_outside"], "the control: a sharded forward outside `unsharded` all-gathers"
        assert dec["collectives"] == [], dec["collectives"]
        assert dec["hooks"] == (3 - 2 * r) * (layers + 1)  # every block's and the root's pre-forward hook
        assert dec["plain_inside"] and dec["sharded_after"] and dec["after"] == 2
    got = two[0]["decode"]["tokens"] + two[1]["decode"]["tokens"]
    assert [len(t) for t in got] == [4, 4, 14, 14]
    assert [t[:4] for t in got] == one["decode"]["tokens"]  # seeds from the global prompt index


def test_dcp_from_two_ranks_loads_at_one(worlds):
    """The 2-rank checkpoint of a sharded, checkpointed model loads at world size 1, checkpointed or plain."""
    _, two, out = worlds
    for model in (worker.tiny_model(), par.parallelize(worker.tiny_model(), checkpointing=True)):
        dist.load_state(out / "ckpt2", {"model": model}, None)
        assert max_rel(model.state_dict(), two[0]["saved"]) == 0.0


def test_stage_config_compiles_trained_blocks_only():
    """`parallel.compile` in a stage's config reaches `parallelize` through `stages.common.prepare`, for the models
    that train (a frozen reference stays eager)."""
    from rlhf_fast.config import ParallelConfig
    from rlhf_fast.stages.common import prepare

    cfg = ParallelConfig(compile=True)
    trained = prepare(worker.tiny_model(), device=torch.device("cpu"), parallel_cfg=cfg)
    frozen = prepare(worker.tiny_model().requires_grad_(False), device=torch.device("cpu"), parallel_cfg=cfg)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in par.blocks(trained))
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in par.blocks(frozen))
