"""The rollout under tensor parallelism (issue 23 part 3): `RolloutEngine` and `teacher_forced_logprobs` on a model
split by `parallelize.tensor_parallel`, inside `parallelize.unsharded` (FSDP gathers over dp only).

World 2 (tp 2) and world 4 (dp 2 x tp 2; the dp groups generate different prompts), one `torchrun --standalone`
launch each of `tests/_tp_rollout_worker.py` (CPU gloo, one thread per rank), against this process at tp 1, for a
tiny untied Llama and a tied Qwen3 (q/k norms, a sliding-window layer):

* the ranks of a tp group return the same completions, bit for bit (tokens, log-probs), with a fixed seed and with
  seed None (the group shares its first rank's), in the default and the deterministic mode;
* greedy tokens equal one process's (a difference allowed only where one process's two best logits tie within
  fp32 rounding); the sampled tokens are one process's draws: each is the token whose CDF interval (one process's
  distribution, in token order) holds the Philox uniform of its (seed, sequence, position), within 1e-5; and with
  top-k / top-p the tokens equal one process's;
* the engine's log-probs equal teacher-forced ones under tp (1e-5; deterministic mode: bitwise), the trainer's
  (packed forward + vocab-parallel `head_logprobs`, 1e-5) and one process's (1e-5);
* the deterministic-mode forward's gradients under tp equal one process's (1e-5);
* per-rank bytes (printed: run with -s): the KV cache of the same number of blocks and the parameters tp splits are
  1/tp of one process's during the rollout (the policy is never gathered over tp), the norms whole.
"""
from __future__ import annotations

import pytest
import torch

from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.rollout import philox, teacher_forced_logprobs
from tests import _tp_rollout_worker as worker
from tests.test_distributed import in_one_process, rank_results, torchrun

TOL = 1e-5  # fp32: a tp rank's matmuls reduce over its heads / columns, then the all-reduce adds the ranks' parts
WORLDS = (2, 4)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(one-process results, {world: [rank results]}, the one-process models)."""
    out = tmp_path_factory.mktemp("tp_rollout")
    one = in_one_process(worker.run)
    runs = {}
    for w in WORLDS:
        torchrun("tests._tp_rollout_worker", str(out), nproc=w, timeout=600)
        runs[w] = rank_results(out, f"w{w}", w)
    return one, runs, {k: worker.tiny_model(k) for k in worker.KINDS}


def by_key(seqs: list[dict]) -> dict[tuple[int, int], dict]:
    """Completions keyed by (global prompt index, sample)."""
    out, seen = {}, {}
    for s in seqs:
        j = seen[s["prompt"]] = seen.get(s["prompt"], -1) + 1
        out[(s["prompt"], j)] = s
    return out


def gathered(ranks: list[dict], kind: str, mode: str, name: str) -> dict[tuple[int, int], dict]:
    """Every dp group's completions (from each group's first tp rank), keyed by (global prompt, sample)."""
    out = {}
    for r in ranks:
        if r["rank"] % worker.TP == 0:
            out.update(by_key(r[kind][mode][name]))
    return out


def full_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """One process's float32 logits (len(tokens), V) of the positions that predict `tokens` after `prompt`."""
    batch = pack([prompt], [tokens])
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    with torch.no_grad():
        return model.logits(packed_hidden(model, batch, rows=rows), False)


@pytest.mark.parametrize("world", WORLDS)
def test_layout_and_tp_ranks_agree(worlds, world):
    """The dp x tp layout; every rank of a tp group returned the same completions bit for bit, in every mode and
    sampling setting, seed None included; the dp groups generated their own prompts."""
    _, runs, _ = worlds
    ranks = runs[world]
    assert [(r["tp_size"], r["dp_size"]) for r in ranks] == [(worker.TP, world // worker.TP)] * world
    for kind in worker.KINDS:
        for mode in ("default", "det"):
            for name in ("greedy", "sampled") + (("cut", "unseeded") if mode == "default" else ()):
                for g in range(0, world, worker.TP):
                    lead = ranks[g][kind][mode][name]
                    for r in ranks[g + 1:g + worker.TP]:
                        other = r[kind][mode][name]
                        assert [s["tokens"] for s in other] == [s["tokens"] for s in lead], (kind, mode, name)
                        assert all(torch.equal(a["logprobs"], b["logprobs"]) for a, b in zip(other, lead))
            prompts = [sorted({s["prompt"] for s in ranks[g][kind][mode]["greedy"]})
                       for g in range(0, world, worker.TP)]
            assert sorted(p for ps in prompts for p in ps) == list(range(len(worker.PROMPTS)))
            assert len(prompts) == 1 or not set(prompts[0]) & set(prompts[1])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_greedy_matches_one_process(worlds, world, kind):
    """Greedy tokens are one process's (a difference only where its two best logits tie within fp32 rounding) and
    their log-probs within 1e-5, in both modes."""
    one, runs, models = worlds
    for mode in ("default", "det"):
        ref, got = by_key(one[kind][mode]["greedy"]), gathered(runs[world], kind, mode, "greedy")
        assert got.keys() == ref.keys()
        for k, s in got.items():
            a, b = s["tokens"], ref[k]["tokens"]
            if a != b:
                i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                z = full_logits(models[kind], worker.PROMPTS[k[0]], b)[i]
                assert float(z[b[i]] - z[a[i]]) < TOL, (kind, mode, k, i)
                continue
            assert float((s["logprobs"] - ref[k]["logprobs"]).abs().max()) <= TOL, (kind, mode, k)


def cdf_misses(model, seqs: dict, seed: int, n: int, temperature: float) -> list:
    """The draws of `seqs` that are not one process's inverse-CDF draw: at each (sequence, position) the Philox
    uniform u of (seed, global sequence index, position) must fall in the token's CDF interval of one process's
    softmax(logits / temperature) in token order (float64), within TOL."""
    key = philox.seed_key(seed, torch.device("cpu"))
    misses = []
    for (p, j), s in seqs.items():
        prompt, toks = worker.PROMPTS[p], s["tokens"]
        z = full_logits(model, prompt, toks).double() / temperature  # (L, V)
        cdf = torch.softmax(z, -1).cumsum(-1)
        u = philox.uniform(key, torch.full((len(toks),), p * n + j),
                           torch.arange(len(prompt) - 1, len(prompt) + len(toks) - 1)).double()
        for i, t in enumerate(toks):
            lo = float(cdf[i, t - 1]) if t else 0.0
            if not lo - TOL <= float(u[i]) <= float(cdf[i, t]) + TOL:
                misses.append((p, j, i))
    return misses


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_sampled_tokens_are_one_process_draws(worlds, world, kind):
    """Every sampled token is the one one process's sampler draws with the same seed (its CDF interval holds the
    uniform, within fp32 rounding), and the tokens equal one process's (so no boundary flip here); with top-k /
    top-p too. Control: the same check with another seed misses."""
    one, runs, models = worlds
    p = worker.SAMPLED
    for mode in ("default", "det"):
        got = gathered(runs[world], kind, mode, "sampled")
        assert cdf_misses(models[kind], got, p.seed, p.n, p.temperature) == [], (kind, mode)
        for name in ("sampled", "cut") if mode == "default" else ("sampled",):
            ref = by_key(one[kind][mode][name])
            assert {k: s["tokens"] for k, s in gathered(runs[world], kind, mode, name).items()} == \
                   {k: s["tokens"] for k, s in ref.items()}, (kind, mode, name)
    assert cdf_misses(models[kind], got, p.seed + 1, p.n, p.temperature), "control: another seed's uniforms"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_logprobs_equal_teacher_forced_trainer_and_one_process(worlds, world, kind):
    """The engine's log-probs under tp: teacher-forced ones under tp within 1e-5 (deterministic mode: bitwise), the
    trainer's (vocab-parallel, full distribution) within 1e-5, one process's teacher-forced ones of the same tokens
    within 1e-5 (top-k / top-p: the cut distribution's)."""
    _, runs, models = worlds
    for r in runs[world]:
        for mode in ("default", "det"):
            res = r[kind][mode]
            for name in ("greedy", "sampled") + (("cut",) if mode == "default" else ()):
                for s, tf in zip(res[name], res[name + "_tf"]):
                    if mode == "det":
                        assert torch.equal(s["logprobs"], tf), (kind, name)
                    assert float((s["logprobs"] - tf).abs().max()) <= TOL, (kind, mode, name)
                for s, tr in zip(res[name], res.get(name + "_trainer", [])):
                    assert float((s["logprobs"] - tr).abs().max()) <= TOL, (kind, mode, name)
    for mode in ("default", "det"):
        for name, params in (("sampled", worker.SAMPLED), ("cut", worker.CUT))[:2 if mode == "default" else 1]:
            seqs = list(gathered(runs[world], kind, mode, name).values())
            ref = teacher_forced_logprobs(models[kind], [worker.PROMPTS[s["prompt"]] for s in seqs],
                                          [s["tokens"] for s in seqs], temperature=params.temperature,
                                          top_k=params.top_k, top_p=params.top_p)
            assert max(float((s["logprobs"] - x).abs().max()) for s, x in zip(seqs, ref)) <= TOL, (kind, mode)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", worker.KINDS)
def test_bytes_per_rank(worlds, world, kind):
    """Per rank (printed): the KV cache of the same blocks is 1/tp of one process's (kv_heads / tp heads); during the
    rollout the parameters tp splits are 1/tp of one process's (never gathered over tp), the norms whole; at rest
    FSDP shards both further over dp."""
    one, runs, _ = worlds
    o = one[kind]
    for r in runs[world]:
        kv, okv = r[kind]["default_kv"], o["default_kv"]
        print(f"\n{kind} world {world} rank {r['rank']} (dp {r['dp_rank']}/{r['dp_size']}, tp {r['tp_size']}): "
              f"KV cache {kv['bytes']} B {kv['shape']} vs one process {okv['bytes']} B {okv['shape']}; params in "
              f"rollout split {r[kind]['bytes_rollout']['split']} B + whole {r[kind]['bytes_rollout']['whole']} B, "
              f"at rest split {r[kind]['bytes_rest']['split']} B + whole {r[kind]['bytes_rest']['whole']} B; one "
              f"process {o['bytes_rollout']['whole']} B")
        assert kv["bytes"] * worker.TP == okv["bytes"] == r[kind]["early_kv"] * worker.TP and r[kind]["det_kv"] == kv
        early, greedy = r[kind]["early"], r[kind]["default"]["greedy"]  # an engine made before the split follows it
        assert [s["tokens"] for s in early] == [s["tokens"] for s in greedy]
        assert all(torch.equal(a["logprobs"], b["logprobs"]) for a, b in zip(early, greedy))
        assert kv["bytes_per_block"] * worker.TP == okv["bytes_per_block"]
        total = o["bytes_rollout"]["whole"]  # one process: nothing is split
        roll = r[kind]["bytes_rollout"]
        norms = total - roll["split"] * worker.TP
        assert roll["whole"] == norms > 0 and roll["split"] * worker.TP < total
        # at rest FSDP holds this rank's dp shard of its tp shards: the dp ranks of one tp index partition them
        peers = [x for x in runs[world] if x["rank"] % worker.TP == r["rank"] % worker.TP]
        assert sum(x[kind]["bytes_rest"]["split"] for x in peers) == roll["split"]
        assert sum(x[kind]["bytes_rest"]["whole"] for x in peers) == roll["whole"]


@pytest.mark.parametrize("world", WORLDS)
def test_deterministic_mode_gradients_match_one_process(worlds, world):
    """The deterministic-mode forward under tp (the split projections' `batch_invariant` path: local fixed-chunk
    GEMMs, row-parallel partials added in rank order, a column-parallel input's gradient summed over the ranks) gives
    one process's gradients of the greedy completions' log-probs (summed over the dp groups' prompts), every
    parameter within 1e-5 of its largest."""
    one, runs, _ = worlds
    want = one["llama"]["det_grads"]
    for r in runs[world]:
        got = r["llama"]["det_grads"]
        assert got.keys() == want.keys()
        for n, g in got.items():
            assert float((g - want[n]).abs().max()) <= TOL * float(want[n].abs().max()), (world, r["rank"], n)


def test_packed_head_under_tp(worlds):
    """At world 2 a tp rank's lm_head rows (16384 x 128 of a 32768-token vocabulary) go through the oneDNN-reordered
    head (`rollout.tp.pack_head`) outside deterministic mode; the sampled tokens equal one process's (whose whole
    head is reordered too) and their log-probs agree within 1e-5."""
    one, runs, _ = worlds
    ref = one["packed_head"]
    assert ref["packed"], "oneDNN's reorder applies to the one-process head (an x86 CPU build of torch)"
    for r in runs[2]:
        got = r["packed_head"]
        assert got["packed"]
        assert [s["tokens"] for s in got["completions"]] == [s["tokens"] for s in ref["completions"]]
        assert max(float((a["logprobs"] - b["logprobs"]).abs().max())
                   for a, b in zip(got["completions"], ref["completions"])) <= TOL
