"""`rlhf_fast.distributed` at world size 2 (real `torchrun --standalone --nproc_per_node 2`, CPU gloo, one thread per
rank) against world size 1 (this process): FSDP2 training on unequal lengths, DCP checkpoints resumed 2 -> 1 and
1 -> 2, global statistics, the Hugging Face export, generation with uneven lengths. One torchrun launch for all."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import distributed as dist
from tests import _dist_worker as worker

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-5


def torchrun(module: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc -m module args` with one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def max_rel(sd_a: dict, sd_b: dict) -> float:
    assert sd_a.keys() == sd_b.keys()
    return max(float((sd_a[k] - sd_b[k]).abs().max() / sd_b[k].abs().max().clamp(min=1e-12)) for k in sd_a)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(world-size-1 results, [rank 0, rank 1] results, output dir)."""
    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    one = worker.run(out, None)  # writes ckpt1 for the 1 -> 2 resume
    torchrun("tests._dist_worker", str(out))
    two = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model, opt = worker.make(out / "ckpt2")  # 2 -> 1
    one["resumed_steps"] = worker.train(model, opt, worker.batches()[2:])
    one["resumed_final"] = model.state_dict()
    return one, two, out


def test_world_size_one_is_plain():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    m = worker.tiny_llama()
    assert dist.shard(m) is m and not dist.is_sharded(m)
    assert dist.all_sum(3.5) == 3.5 and dist.all_sum([1, 2]) == [1, 2] and dist.all_true(True)
    assert dist.rank_slice(7) == slice(0, 7) and dist.micro_slices(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]


def test_slices_cover_the_global_batch():
    for n, w in ((7, 2), (8, 3), (5, 5)):
        parts = [dist.rank_slice(n, rank_=r, world=w) for r in range(w)]
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_two_ranks_match_one_process(worlds):
    one, two, _ = worlds
    for (l1, g1), (l2, g2) in zip(one["steps"], two[0]["steps"]):
        assert close(l1, l2) and close(g1, g2), (one["steps"], two[0]["steps"])
    assert two[0]["steps"] == two[1]["steps"]  # every rank logs the same global numbers
    assert max_rel(two[0]["final"], one["final"]) < REL


def test_per_rank_mean_loss_fails_the_same_check(worlds):
    one, two, _ = worlds
    (l1, g1), (l2, g2) = one["per_rank_mean"][0], two[0]["per_rank_mean"][0]
    assert close(l1, one["steps"][0][0]) and close(g1, one["steps"][0][1])  # at N = 1 it is the same loss
    assert not close(l2, l1) and not close(g2, g1)  # at N = 2 a mean of means fails the same tolerance


def test_resume_across_world_sizes(worlds):
    one, two, _ = worlds
    # 2 -> 1 (here) and 1 -> 2 (in the torchrun job): the last step matches the uninterrupted run
    for res, ref in ((one, two[0]), (two[0], one)):
        (l, g), = res["resumed_steps"]
        assert close(l, ref["steps"][2][0]) and close(g, ref["steps"][2][1])
        assert max_rel(res["resumed_final"], ref["final"]) < REL


def test_dcp_layout(worlds):
    out = worlds[2]
    assert sorted(p.name for p in (out / "ckpt2").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_export_round_trip_is_exact(worlds):
    from transformers import AutoModelForCausalLM

    one, two, out = worlds
    loaded = AutoModelForCausalLM.from_pretrained(out / "export2", dtype=torch.float32)
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in two[0]["final"].items())
    fresh = worker.tiny_llama()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    ids = torch.randint(2, worker.VOCAB, (2, 9))
    ref = worker.tiny_llama()
    ref.load_state_dict(two[0]["final"])
    assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_global_moments(worlds):
    one, two, _ = worlds
    assert two[0]["moments"] == two[1]["moments"]
    assert all(close(a, b, 1e-12) for a, b in zip(one["moments"], two[0]["moments"]))


def test_uneven_generation_completes(worlds):
    one, two, _ = worlds
    assert two[0]["after_generate"] == 2
    got = two[0]["tokens"] + two[1]["tokens"]
    assert [len(t) for t in two[0]["tokens"]] == [4, 4] and all(len(t) == 14 for t in two[1]["tokens"])
    assert [t[:4] for t in got] == one["tokens"]  # seeds from the global prompt index: the split does not matter
