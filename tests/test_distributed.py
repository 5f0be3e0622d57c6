"""Scale-out at world size 2 (real `torchrun --standalone --nproc_per_node 2`, CPU gloo, one thread per rank) against
world size 1 (this process), in one torchrun launch for everything:

- `rlhf_fast.distributed`: FSDP2 training (`parallelize`) on unequal lengths, a per-rank-mean loss failing the same
  check, DCP checkpoints resumed 2 -> 1 and 1 -> 2, global statistics, the Hugging Face export (`models.save_model`),
  uneven generation lengths;
- the stages: SFT, RM (sharded and gradient-checkpointed blocks together), LoRA SFT (sharded adapters, merged export
  and `adapter/`) and PPO at N = 2 against N = 1 (per-step losses and gradient norms, final weights), PPO stop and
  resume at N = 2 (bitwise), SFT resumed 2 -> 1 and 1 -> 2; the CLI at world size 1 equals the plain call."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import distributed as dist
from tests import _dist_stages as stages
from tests import _dist_worker as worker

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-5


def torchrun(module: str, *args: str, nproc: int = 2, timeout: int = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc -m module args` with one thread per rank; `check`: it must
    succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 or not check, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def rank_results(out, prefix: str, world: int) -> list:
    """Every rank's saved results of a torchrun launch, `<out>/<prefix>_rank<r>.pt`, in rank order."""
    return [torch.load(out / f"{prefix}_rank{r}.pt", weights_only=False) for r in range(world)]


def in_one_process(fn, *args):
    """fn(*args) in this process, torch's thread count restored afterwards (a worker's one-process run sets its own)."""
    n = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def close(a: float, b: float, rel: float = REL, atol: float = 0.0) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12) + atol


def max_rel(sd_a: dict, sd_b: dict) -> float:
    assert sd_a.keys() == sd_b.keys()
    return max(float((sd_a[k] - sd_b[k]).abs().max() / sd_b[k].abs().max().clamp(min=1e-12)) for k in sd_a)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(world-size-1 results, [rank 0, rank 1] results, output dir)."""
    out = tmp_path_factory.mktemp("dist")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = worker.run(out, None)  # writes ckpt1 for the 1 -> 2 resume
        stages.prepare(out / "stages")
        stages.run_world(out / "stages")  # writes sft1s for the 1 -> 2 resume, and RM/PPO's start models
        torchrun("tests._dist_worker", str(out))
        two = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
        model, opt = worker.make(out / "ckpt2")  # 2 -> 1
        one["resumed_steps"] = worker.train(model, opt, worker.batches()[2:])
        one["resumed_final"] = model.state_dict()
        from rlhf_fast.stages.sft import train_sft

        train_sft(stages.configs(out / "stages")[0], out / "stages" / "sft2s", plots=False)  # 2 -> 1
    finally:
        torch.set_num_threads(n)
    return one, two, out


def test_world_size_one_is_plain():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    from rlhf_fast import parallelize

    m = worker.tiny_llama()
    assert parallelize.parallelize(m) is m and not dist.is_sharded(m)
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
        (loss, gnorm), = res["resumed_steps"]
        assert close(loss, ref["steps"][2][0]) and close(gnorm, ref["steps"][2][1])
        assert max_rel(res["resumed_final"], ref["final"]) < REL


def test_dcp_layout(worlds):
    out = worlds[2]
    assert sorted(p.name for p in (out / "ckpt2").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_export_round_trip_is_exact(worlds):
    """The sharded model's export (gathered, rank 0 writes) holds its final weights bitwise, and transformers loads it
    with our logits."""
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models import load_model
    from rlhf_fast.models.packed import pack, packed_hidden

    one, two, out = worlds
    ours = load_model(out / "export2", "export")
    assert ours.state_dict().keys() == two[0]["final"].keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in two[0]["final"].items())
    hf = AutoModelForCausalLM.from_pretrained(out / "export2", dtype=torch.float32).eval()
    ids = torch.randint(2, worker.VOCAB, (9,)).tolist()
    with torch.no_grad():
        logits = ours.logits(packed_hidden(ours, pack([ids], [[]])), False)
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], logits, atol=2e-5, rtol=1e-5)


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


# --- the stages ------------------------------------------------------------------------------------------------


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    if (model_dir / "scalar_head.safetensors").is_file():
        sd.update({f"head.{k}": v for k, v in load_file(str(model_dir / "scalar_head.safetensors")).items()})
    return sd


def same_run(a: Path, b: Path, finals: tuple[str, ...], *, keys: tuple[str, ...], rel: float = REL) -> None:
    """Run directories `a`, `b` logged the same per-step `keys` (within `rel`) and ended with the same weights."""
    ra, rb = rows(a / "metrics.jsonl"), rows(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in keys:
            if k in x:
                assert close(x[k], y[k], rel, 1e-6), (a.name, b.name, x["step"], k, x[k], y[k])  # atol: KL ~ 0
    for f in finals:
        wa, wb = weights(a / "final" / f), weights(b / "final" / f)
        if a.name.startswith("rm"):  # the BT loss sees score differences only: the head's bias has gradient 0 up
            wa, wb = ({k: v for k, v in w.items() if k != "head.bias"} for w in (wa, wb))  # to rounding noise,
        assert max_rel(wa, wb) < rel, (a.name, f, max_rel(wa, wb))  # which Adam turns into +-lr steps


def test_sft_two_ranks_match_one(worlds):
    root = worlds[2] / "stages"
    same_run(root / "sft1", root / "sft2", ("",), keys=("loss", "grad_norm", "eval_loss"))


def test_rm_two_ranks_match_one(worlds):
    root = worlds[2] / "stages"
    same_run(root / "rm1", root / "rm2", ("",), keys=("loss", "grad_norm", "train_accuracy", "eval_accuracy"))


@pytest.mark.parametrize("micro", [0, 2])
@pytest.mark.parametrize("dtype,tol", [("torch.float32", 1e-5), ("torch.float64", 1e-12)])
def test_rm_first_step_gradient_two_ranks_match_one(worlds, dtype, tol, micro):
    """The sharded padding-free RM step (global pair weights, micro-batches, ties) is the one-process gradient:
    to rounding in fp32 and to ~1e-15 in float64, where a per-rank or per-micro-batch pair count or a lost pair
    would still show at ~1e-1. The head's bias alone has gradient 0 (the BT loss sees score differences): only
    rounding is left of it, which Adam turns into +-lr steps (why the whole-run comparisons leave it out)."""
    root = worlds[2] / "stages"
    (l1, g1), (l2, g2) = (torch.load(root / f"rm_grad{w}.pt")[f"{dtype}/{micro}"] for w in (1, 2))
    assert close(l1, l2, 1e-6)  # the loss is fp32 in both dtypes (scores leave the head as fp32)
    scale = max(float(g.abs().max()) for g in g1.values())
    assert float(g1["head.bias"].abs()) < 1e-5 * scale and float(g2["head.bias"].abs()) < 1e-5 * scale
    g1, g2 = ({k: v for k, v in g.items() if k != "head.bias"} for g in (g1, g2))
    assert max_rel(g2, g1) < tol, max_rel(g2, g1)


def test_lora_sft_two_ranks_match_one(worlds):
    """LoRA on sharded blocks: the same losses and merged export as one process, and the same adapter file."""
    from safetensors.torch import load_file

    root = worlds[2] / "stages"
    same_run(root / "sftl1", root / "sftl2", ("",), keys=("loss", "grad_norm", "eval_loss"))
    a, b = (load_file(str(root / d / "final" / "adapter" / "adapter_model.safetensors")) for d in ("sftl1", "sftl2"))
    assert a.keys() == b.keys() and max_rel(b, a) < REL
    assert rows(root / "sftl2" / "metrics.jsonl")[0]["loss"] > 0


def test_ppo_two_ranks_match_one(worlds):
    root = worlds[2] / "stages"
    keys = ("score", "kl", "kl_coef", "pg_loss", "vf_loss", "vf_explained_var", "entropy", "clip_frac", "approx_kl",
            "grad_norm")
    same_run(root / "ppo1", root / "ppo2", ("policy", "value"), keys=keys)
    for x, y in zip(rows(root / "ppo1" / "metrics.jsonl"), rows(root / "ppo2" / "metrics.jsonl")):
        # the same rollout tokens: identical lengths (and, above, the same reward-model scores)
        assert x["generated_tokens"] == y["generated_tokens"] and x["response_len"] == y["response_len"]


def test_grpo_seq_mean_two_ranks_match_one(worlds):
    root = worlds[2] / "stages"
    keys = ("score", "kl", "pg_loss", "entropy", "clip_frac", "approx_kl", "grad_norm", "generated_tokens")
    same_run(root / "grpo1", root / "grpo2", ("policy",), keys=keys)


def test_stop_and_resume(worlds):
    root = worlds[2] / "stages"
    a, b = rows(root / "ppo2" / "metrics.jsonl"), rows(root / "ppo2r" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if not k.startswith("time")} for r in a] == \
        [{k: v for k, v in r.items() if not k.startswith("time")} for r in b]  # N = 2, stopped and resumed: bitwise
    for f in ("policy", "value"):
        wa, wb = weights(root / "ppo2" / "final" / f), weights(root / "ppo2r" / "final" / f)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    same_run(root / "sft1", root / "sft1s", ("",), keys=("loss", "grad_norm"))  # 1 -> 2
    same_run(root / "sft2", root / "sft2s", ("",), keys=("loss", "grad_norm"))  # 2 -> 1


def test_rank_failure_keeps_the_last_checkpoint(worlds):
    from rlhf_fast.checkpoint import damage, find_checkpoint, load_state

    root = worlds[2] / "stages"
    p = torchrun("tests._dist_fault", str(root), "fail", check=False, timeout=300)
    assert p.returncode != 0 and "injected fault on rank 1 after step 3" in p.stdout + p.stderr  # the job is down
    run = root / "sft2f"
    assert not (run / "final").exists()
    ckpt = find_checkpoint(run / "checkpoint")
    assert ckpt is not None and damage(ckpt) is None and load_state(ckpt)["step"] == 2  # step 2's, intact
    torchrun("tests._dist_fault", str(root), "resume")  # the same command again resumes from it
    wa, wb = weights(run / "final"), weights(root / "sft2" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise the uninterrupted N = 2 run
    assert rows(run / "metrics.jsonl") == rows(root / "sft2" / "metrics.jsonl")


def test_torchrun_one_process_is_bitwise_the_plain_call(worlds, tmp_path):
    import yaml

    from rlhf_fast.config import to_dict

    root = worlds[2] / "stages"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(stages.configs(root)[0])))
    torchrun("rlhf_fast", "sft", "--config", str(cfg), "--out", str(tmp_path / "run"), nproc=1)
    wa, wb = weights(tmp_path / "run" / "final"), weights(root / "sft1" / "final")  # sft1: train_sft in-process
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rows(tmp_path / "run" / "metrics.jsonl") == rows(root / "sft1" / "metrics.jsonl")


def test_pipeline_stop_after_stage(tmp_path, capsys):
    from rlhf_fast.cli import main
    from tests.test_pipeline import TOY

    argv = ["pipeline", "--out", str(tmp_path / "p"), "--stop-after", "rm:1"] + [a for kv in TOY for a in ("--set", kv)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(n)
    assert json.loads(capsys.readouterr().out) == {"stopped": "rm", "steps": 1,
                                                   "checkpoint": str(tmp_path / "p" / "rm" / "checkpoint")}
    assert (tmp_path / "p" / "sft" / "final").is_dir() and not (tmp_path / "p" / "rm" / "final").exists()
    assert not (tmp_path / "p" / "report.json").exists()


def test_stop_after_flag():
    from rlhf_fast.cli import _parse_stop_after
    from rlhf_fast.config import ConfigError

    assert _parse_stop_after("sft", "5") == 5 and _parse_stop_after("pipeline", "rm:7") == ("rm", 7)
    for cmd, bad in (("sft", "rm:3"), ("pipeline", "3"), ("pipeline", "eval:2"), ("ppo", "0")):
        with pytest.raises(ConfigError, match="--stop-after"):
            _parse_stop_after(cmd, bad)
