"""Mixture-of-experts models under tensor parallelism (experts split over the tp ranks) at world size 1 (the test
process, the reference) and under torchrun (world 2: tp 2; world 4: dp 2 x tp 2), `python -m tests._tp_moe_worker
OUT`, for `tests/test_tp_moe.py`. Each rank writes what it saw to `OUT/w<world>_rank<r>.pt`.

Per kind (a Qwen3-MoE with a dense layer, 24-wide experts (the grouped GEMM) and one kv head (replicated at tp 2); a
Mixtral with 18-wide experts (one GEMM per expert), a sliding window), parallelized as a stage prepares it
(`parallelize(model, tp=2)`, FSDP2 over dp at world 4): the packed forward's hidden states and logits, its routes and
balance loss (default and deterministic mode), and whether replaying its routes gives the same hidden states bit for
bit; the loss (summed log-probs + the balance loss) and every parameter's gradient; one AdamW step, written as a DCP
checkpoint (and, under torchrun, the world-1 checkpoint read into this layout); inside `parallelize.unsharded`: the
engine's greedy and sampled completions with their routes; this rank's bytes of the experts and of the rest.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from rlhf_fast import distributed as dist
from rlhf_fast import parallelize as par
from rlhf_fast.rollout import RolloutEngine, SamplingParams

VOCAB = 64
TP = 2
KINDS = ("qwen3_moe", "mixtral")
PROMPTS = [[1, 5, 7], [9, 40, 2, 33, 34, 60, 61, 17, 32], [3] * 12, [63, 31, 32, 0, 8]]
RESPONSES = [[4, 6, 8, 10], [11, 12], [13, 50, 51], [20, 21, 22, 23, 24]]
NEW = 6
BLOCK, BLOCKS = 4, 48
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=0.9, n=2, seed=7)
BALANCE = 0.5  # the balance loss's weight in the loss whose gradients are compared


def config(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None, tie_word_embeddings=False)
    if kind == "qwen3_moe":  # layer 1 dense (column / row parallel MLP), layer 0 4 experts of 24; one kv head:
        # at tp 2 each rank computes it from the whole k/v weights (kv heads replicated)
        return tf.Qwen3MoeConfig(head_dim=8, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1],
                                 **{**common, "num_key_value_heads": 1})
    return tf.MixtralConfig(intermediate_size=18, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                            **common)


def tiny_model(kind: str) -> nn.Module:
    """The same perturbed tiny model in every process."""
    from rlhf_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(config(kind), device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            model.embed.weight.mul_(0.3)
            for b in model.layers:  # routers with clear preferences: top-k ties would make the comparison moot
                if b.sparse:
                    b.mlp.router.weight.mul_(20.0)
    return model.eval()


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def local_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's bytes of the experts' stacked weights and of every other parameter."""
    from torch.distributed.tensor import DTensor

    out = {"experts": 0, "other": 0}
    for n, p in model.named_parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        out["experts" if ".experts." in n else "other"] += t.numel() * t.element_size()
    return out


def forward_checks(model: nn.Module, det: bool, replay: bool = True) -> dict:
    """Hidden states, logits, routes and balance loss of the packed batch; the loss and every parameter's gradient.
    At dp > 1 every dp rank runs the whole batch with the loss divided by dp: FSDP's summed gradients are one
    process's."""
    from rlhf_fast.models.moe import RoutingRecord
    from rlhf_fast.models.packed import pack, packed_hidden
    from rlhf_fast.ops.vocab_parallel import head_logprobs
    from rlhf_fast.rollout import tp

    batch = pack(PROMPTS, RESPONSES)
    rows, labels = [], []
    for (p0, p1, r0, r1), r in zip(batch.samples, RESPONSES):
        rows += [p1 - 1] + list(range(r0, r1 - 1))
        labels += r
    rec = RoutingRecord.record(balance_loss=True)
    model.zero_grad(set_to_none=True)
    h = packed_hidden(model, batch, deterministic=det, rows=torch.tensor(rows), routing=rec)
    with torch.no_grad():  # the root (lm_head) stays gathered over dp from its forward to its backward
        z = tp.logits(model, h.detach(), det)  # (R, V) gathered over tp
    lp = head_logprobs(h, model.lm_head, torch.tensor(labels))
    bal = rec.balance_loss()
    loss = (-lp.sum() + BALANCE * bal) / dist.dp_size()
    loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}  # before a forward re-gathers the root
    out = {}
    if replay:  # routing replay of the record (what the PPO passes do with a rollout's routes)
        with torch.no_grad(), par.unsharded(model):  # which leaves FSDP's root resharded, as a stage's rollout
            rep = RoutingRecord.replay(rec.experts)
            replayed = packed_hidden(model, batch, deterministic=det, rows=torch.tensor(rows), routing=rep)
        out = {"replay_equal": torch.equal(replayed, h.detach()), "replay_flips": rep.flip_fraction()}
    return {**out, "hidden": h.detach().clone(), "logits": z.clone(), "routes": rec.experts.clone(),
            "balance": bal.detach(),
            "loss": loss.detach() * dist.dp_size(), "grads": grads}


def kind_checks(kind: str, out: Path) -> dict:
    from rlhf_fast import checkpoint

    model = tiny_model(kind)
    par.parallelize(model, tp=TP if dist.world_size() > 1 else 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # on the sharded parameters, as a stage makes it
    res = {"bytes_rest": local_bytes(model), "names": sorted(model.state_dict())}
    for det in (False, True):
        res["det" if det else "default"] = forward_checks(model, det)
    with par.unsharded(model):
        res["bytes_rollout"] = local_bytes(model)
        eng = RolloutEngine(model, block_size=BLOCK, num_blocks=BLOCKS)
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            res[name] = [{"prompt": c.prompt_index, "tokens": list(c.token_ids), "logprobs": c.logprobs.clone(),
                          "routes": c.routes.clone()} for c in eng.generate(PROMPTS, params)]
    # one AdamW step on the default mode's gradients (forward_checks left the deterministic one's: equal within
    # rounding), then the DCP checkpoint of this layout
    res["default_again"] = forward_checks(model, False, replay=False)["loss"]  # no forward after its backward
    opt.step()
    res["stepped"] = {n: full(p) for n, p in model.named_parameters()}
    checkpoint.write_models(out / f"ckpt_{kind}_w{dist.world_size()}", {"policy": model}, opt)
    if dist.world_size() > 1:  # the world-1 checkpoint (written by the test process first) into this layout
        fresh = par.parallelize(tiny_model(kind), tp=TP)
        opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        checkpoint.read_models(out / f"ckpt_{kind}_w1", {"policy": fresh}, opt2)
        res["loaded_from_1"] = {n: full(p) for n, p in fresh.named_parameters()}
        res["loaded_from_1_moments"] = {n: full(opt2.state[p]["exp_avg"]) for n, p in fresh.named_parameters()}
    res["moments"] = {n: full(opt.state[p]["exp_avg"]) for n, p in model.named_parameters()}
    return res


def run(out: Path) -> dict:
    torch.set_num_threads(1)
    res = {kind: kind_checks(kind, out) for kind in KINDS}
    res.update(tp_size=dist.tp_size(), dp_size=dist.dp_size(), dp_rank=dist.dp_rank(), rank=dist.rank())
    return res


def main(out: Path) -> None:
    dist.init(timeout_s=120)
    res = run(out)
    torch.save(res, out / f"w{dist.world_size()}_rank{dist.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
