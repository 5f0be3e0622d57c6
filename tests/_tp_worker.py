"""Tensor parallelism (`parallel.tp`) at world size 1 (the test process, tp 1) and under torchrun: world 2 (tp 2)
and world 4 (dp 2 x tp 2), `python -m tests._tp_worker OUT`, for `tests/test_tensor_parallel.py`. Each rank writes
what it saw to `OUT/w<world>_rank<r>.pt`; the test compares the worlds.

Per model kind (an untied Llama, a tied one, an untied one with checkpointed, compiled blocks): the packed
forward's hidden states of a batch, then one SFT step as the stage takes it (`stages.sft.response_nll` over this dp
rank's items in micro-batches, the log-probs through `ops.vocab_parallel.head_logprobs`): loss, every parameter's
whole gradient, the global gradient norm, the bytes of this rank's parameters, gradients and optimiser state, the
weights after one AdamW step; a DCP checkpoint of model + optimiser (`distributed.save_state`), and the
one-process checkpoint loaded into a tensor-parallel model. The vocab-parallel op against the whole lm_head in
float64. The SFT stage (`train_sft` with parallel.tp): a whole run, one stopped after two steps (the test resumes
it at world size 1) and the test's stopped one-process run resumed here.

`python -m tests._tp_worker OUT rm` (its own launches) checks the reward model under tp instead, into
`OUT/rm_w<world>_rank<r>.pt`: a `ScalarHeadModel` (backbone split, head replicated) - the packed scores of a batch,
one `stages.rm.step_loss` step (loss, train accuracy, gradients, gradient norm), this rank's parameter and gradient
bytes - and a 2-step `train_rm` with parallel.tp = 2 from the test's SFT model; then PPO under tp from the test's SFT
and reward models (`tests._tp_ppo_worker`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from rlhf_fast import distributed as dist
from rlhf_fast import parallelize as par
from rlhf_fast.config import ModelArch, OptimConfig, ParallelConfig
from rlhf_fast.data import SFTExample
from rlhf_fast.models.packed import pack, packed_hidden

VOCAB = 64  # even: each of 2 tp ranks holds 32 vocabulary rows; token 32 is rank 1's first, 0 the padding row
TP = 2
KINDS = {"llama": (False, False), "tied": (True, False), "ckpt": (False, True)}  # kind -> (tied, checkpointed and
# compiled blocks: dynamo traces the tensor-parallel hooks; the aot_eager backend, inductor takes minutes on CPU)
ARCH = ModelArch(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)  # SFT runs
STOP = 2  # the stopped SFT runs stop after this many steps


def config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def tiny_model(kind: str) -> nn.Module:
    """A freshly initialised tiny Llama of `kind`, the same weights in every process."""
    from rlhf_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(config(KINDS[kind][0]), device="cpu")


def prepared(kind: str, tp: int) -> nn.Module:
    """`tiny_model(kind)` parallelized as a stage prepares it: split over `tp` ranks, FSDP2 over the dp ranks."""
    backend, par.COMPILE_BACKEND = par.COMPILE_BACKEND, "aot_eager"
    try:
        return par.parallelize(tiny_model(kind), tp=tp, checkpointing=KINDS[kind][1], compile=KINDS[kind][1])
    finally:
        par.COMPILE_BACKEND = backend


def examples() -> list[SFTExample]:
    """7 SFT examples of 6..30 tokens (prompt 2..8), ids over the whole vocabulary, padding id 0 and id 32 among
    them, so dp ranks and micro-batches see unequal token counts and both tp ranks' vocabulary rows are used."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(7):
        n, p = int(torch.randint(6, 31, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        ids[i % n] = (0, VOCAB // 2)[i % 2]
        out.append(SFTExample(ids, p))
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def nbytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (its shards of DTensors)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters()]


def sft_step(model: nn.Module) -> float:
    """Forward + backward of this dp rank's part of the global batch in micro-batches of 2, as `train_sft`; the
    global loss (sum of the trained tokens' NLL / their global count)."""
    from rlhf_fast.stages.sft import response_nll, trained_positions

    data = examples()
    n = sum(len(trained_positions(e)) for e in data)
    total = dist.accumulate(data, lambda items, real: response_nll(model, items)[0] / n, 2)
    return dist.all_sum(float(total))


def model_checks(kind: str, tp: int, out: Path) -> dict:
    from rlhf_fast.stages.common import make_optimizer

    model = prepared(kind, tp)
    data = examples()
    with torch.no_grad():
        h = packed_hidden(model, pack([e.input_ids for e in data], [[] for _ in data]))
    loss = sft_step(model)
    params = [p for _, p in named(model)]
    grads = {n: full(p.grad) for n, p in named(model)}
    sizes = {"params": nbytes(params), "grads": nbytes(p.grad for p in params)}
    norm = dist.clip_grad_norm(params, float("inf"))
    opt = make_optimizer(params, OptimConfig(lr=1e-2, weight_decay=0.0))
    opt.step()
    sizes["optim"] = nbytes(v for st in opt.state.values() for k, v in st.items() if k != "step")
    res = {"hidden": h, "loss": loss, "grads": grads, "norm": norm, "bytes": sizes,
           "stepped": {n: full(p) for n, p in named(model)},
           "exp_avg_sq": {n: full(opt.state[p]["exp_avg_sq"]) for n, p in named(model)},
           "split": {n: par.tp_sharded(model) and _is_tp(p) for n, p in named(model)}}
    dist.save_state(out / f"ckpt_{kind}_w{dist.world_size()}", {"model": model}, opt)
    if dist.world_size() > 1:  # and back: the one-process checkpoint into a tensor-parallel model
        fresh = prepared(kind, tp)
        opt2 = make_optimizer([p for _, p in named(fresh)], OptimConfig(lr=1e-2, weight_decay=0.0))
        dist.load_state(out / f"ckpt_{kind}_w1", {"model": fresh}, opt2)
        res["loaded"] = {n: full(p) for n, p in named(fresh)}
        res["loaded_exp_avg_sq"] = {n: full(opt2.state[p]["exp_avg_sq"]) for n, p in named(fresh)}
    return res


def _is_tp(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ())


def op_check(group) -> dict:
    """The vocab-parallel log-probs and entropy (float64, temperature 0.7, a bias, every third row ignored, chunks
    of 50 columns) of this rank's vocabulary rows against the whole weight's reference: values, the gradient of
    hidden (every rank the whole one) and this rank's rows of the weight's and bias's gradients."""
    from rlhf_fast.ops import reference
    from rlhf_fast.ops.vocab_parallel import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(11)
    n, width, vl = 41, 17, 171
    ranks = 1 if group is None else torch.distributed.get_world_size(group)
    me = 0 if group is None else torch.distributed.get_rank(group)
    h = torch.randn(n, width, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vl * ranks, width, dtype=torch.float64, generator=g)
    b = torch.randn(vl * ranks, dtype=torch.float64, generator=g)
    labels = torch.randint(0, vl * ranks, (n,), generator=g)
    labels[::3] = -100
    gl, ge = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    rows = slice(me * vl, (me + 1) * vl)
    wl, bl = w[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(h, wl, labels, vocab_start=rows.start, group=group, bias=bl, temperature=0.7,
                                      return_entropy=True, chunk_size=50)
    got = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, wl, bl))
    wf, bf = w.clone().requires_grad_(), b.clone().requires_grad_()
    rlp, rent = reference.linear_token_logprobs(h, wf, labels, bias=bf, temperature=0.7, return_entropy=True)
    want = torch.autograd.grad((rlp * gl).sum() + (rent * ge).sum(), (h, wf, bf))
    errs = [(lp - rlp).detach().abs().max(), (ent - rent).detach().abs().max(), (got[0] - want[0]).abs().max(),
            (got[1] - want[1][rows]).abs().max(), (got[2] - want[2][rows]).abs().max()]
    return {"max_err": max(float(e) for e in errs), "ignored_zero": bool((lp[::3] == 0).all())}


def sft_config(root: Path, tp: int, **kw):
    from tests._tiny import tiny_sft_config

    paths = {k: str(root / "task" / "data" / f"{k}.jsonl") for k in ("sft_train", "sft_eval")}
    return tiny_sft_config(root / "task", paths, arch=ARCH, batch_size=8, epochs=1, max_steps=4, eval_every=2,
                           optim=OptimConfig(lr=3e-3, warmup_steps=1), device="cpu",
                           parallel=ParallelConfig(micro_batch_size=3, tp=tp), **kw)


def sft_runs(root: Path) -> None:
    """The SFT stage at this world size with tp 2: a whole run, a run stopped after STOP steps, and the stopped
    one-process run (copied by the test to `sft1s_w<world>`) resumed to its end."""
    from rlhf_fast.stages.sft import train_sft

    w = dist.world_size()
    train_sft(sft_config(root, TP), root / f"sft_w{w}", plots=False)
    train_sft(sft_config(root, TP), root / f"sfts_w{w}", stop_after=STOP, plots=False)
    train_sft(sft_config(root, TP), root / f"sft1s_w{w}", plots=False)


def run(out: Path, tp: int) -> dict:
    """Every check at this world size; world size 1 runs them at tp 1 (the reference)."""
    torch.set_num_threads(1)
    res = {kind: model_checks(kind, tp, out) for kind in KINDS}
    group = None
    if dist.world_size() > 1:
        group = dist.use_tp(tp)["tp"].get_group()
    res["op"] = op_check(group)
    res["tp_size"], res["dp_size"], res["dp_rank"] = dist.tp_size(), dist.dp_size(), dist.dp_rank()
    return res


# --- the reward model under tp (`python -m tests._tp_worker OUT rm`) -------------------------------------------


def scalar_model() -> nn.Module:
    """A freshly initialised tiny Llama backbone with a scalar head (`heads.ScalarHeadModel`), the same weights in
    every process."""
    from rlhf_fast.heads import ScalarHeadModel
    from rlhf_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ScalarHeadModel(build_model(config(False), lm_head=False, device="cpu"))


def ranked() -> list:
    """6 prompts of 2..7 tokens with 2..4 completions of 1..9 tokens each (a tie among some), ids over the whole
    vocabulary with 0 and 32 among them: dp ranks and micro-batches see unequal pairs and tokens."""
    from rlhf_fast.data import RankedExample

    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(6):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        prompt[0] = (0, VOCAB // 2)[i % 2]
        k = int(torch.randint(2, 5, (1,), generator=g))
        comps = [torch.randint(0, VOCAB, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(k)]
        ranks = list(range(k)) if i % 3 else [0] + [1] * (k - 1)
        out.append(RankedExample(prompt, comps, ranks))
    return out


def rm_checks(tp: int) -> dict:
    """A ScalarHeadModel split over `tp` ranks (FSDP2 over the dp ranks): the packed scores of every completion of
    the whole batch (no grad), one RM step as the stage takes it (`stages.rm.step_loss`: this dp rank's prompts in
    micro-batches of 2): the global Bradley-Terry loss, train accuracy, every parameter's whole gradient, the global
    gradient norm, this rank's parameter and gradient bytes, which parameters tp split."""
    from rlhf_fast.config import RMConfig
    from rlhf_fast.stages.rm import ranked_batch, score, step_loss

    model = par.parallelize(scalar_model(), tp=tp).train()
    data = ranked()
    with torch.no_grad():
        scores = score(model, ranked_batch(data))
    loss, stats = step_loss(model, data, RMConfig(parallel=ParallelConfig(micro_batch_size=2, tp=tp)))
    params = [p for _, p in named(model)]
    return {"scores": scores.detach().clone(), "loss": dist.all_sum(float(loss)), "accuracy": stats["train_accuracy"],
            "grads": {n: full(p.grad) for n, p in named(model)},
            "norm": dist.clip_grad_norm(params, float("inf")),
            "bytes": {"params": nbytes(params), "grads": nbytes(p.grad for p in params)},
            "split": {n: _is_tp(p) for n, p in named(model)}}


def rm_config(root: Path, tp: int):
    """`train_rm` for 2 steps from the test's SFT model `root/sft1/final`, micro-batches of 2 prompts, evaluation."""
    from rlhf_fast.config import RMConfig

    data = root / "task" / "data"
    return RMConfig(model=str(root / "sft1" / "final"), train_data=str(data / "rm_train.jsonl"),
                    eval_data=str(data / "rm_eval.jsonl"), batch_size=6, max_steps=2, eval_every=1, device="cpu",
                    optim=OptimConfig(lr=3e-3, warmup_steps=1), parallel=ParallelConfig(micro_batch_size=2, tp=tp))


def rm_main(out: Path) -> None:
    """The reward model's checks, then PPO's (`tests._tp_ppo_worker.run`, from the test's SFT and RM models: one
    launch for both)."""
    from rlhf_fast.stages.rm import train_rm
    from tests import _tp_ppo_worker

    torch.set_num_threads(1)
    res = rm_checks(TP)
    train_rm(rm_config(out / "stages", TP), out / "stages" / f"rm_w{dist.world_size()}", plots=False)
    torch.save(res, out / f"rm_w{dist.world_size()}_rank{dist.rank()}.pt")
    _tp_ppo_worker.run(out / "stages", out)


def main(out: Path, what: str = "") -> None:
    dist.init(timeout_s=120)
    if what == "rm":
        rm_main(out)
    else:
        res = run(out, TP)
        sft_runs(out / "stages")
        torch.save(res, out / f"w{dist.world_size()}_rank{dist.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
