"""Module-level checks of `rlhf_fast.distributed`, run by `tests/test_distributed.py` at world size 1 (in the test
process) and under `torchrun --nproc_per_node 2` (`python -m tests._dist_worker OUT`, which then runs the stages of
`tests/_dist_stages.py` too: one launch for everything). Each rank writes what it saw
to `OUT/rank<r>.pt`; the test compares the two worlds.

A tiny Llama (rlhf_fast's own, sharded by `parallelize`) is trained on batches of *unequal* lengths with the fused
log-prob op reading the lm_head weight after the model's packed forward (SFT's `response_nll`), the loss divided by the
global token count, micro-batched.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlhf_fast import distributed as dist
from rlhf_fast import parallelize as par
from rlhf_fast.data import SFTExample
from rlhf_fast.models import save_model
from rlhf_fast.stages.sft import response_nll

VOCAB = 97


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def tiny_llama():
    """Our LlamaLM, the same initial weights in every process."""
    from rlhf_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(config(), device="cpu")


def batches(steps: int = 3, size: int = 6) -> list[list[tuple[list[int], int]]]:
    """`steps` global batches of (token ids, prompt length), lengths 4..24 so ranks see very different counts."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(size):
            n = int(torch.randint(4, 25, (1,), generator=g))
            batch.append((torch.randint(2, VOCAB, (n,), generator=g).tolist(), int(torch.randint(1, n - 1, (1,),
                                                                                                    generator=g))))
        out.append(batch)
    return out


def nll(model, items) -> torch.Tensor:
    return response_nll(model, [SFTExample(ids, p) for ids, p in items])[0]


def train(model, opt, data, *, micro: int = 2, per_rank_mean: bool = False) -> list[tuple[float, float]]:
    """One optimiser step per global batch; returns (global loss, grad norm) per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for batch in data:
        n_global = sum(len(s) - p for s, p in batch)  # every rank knows the whole global batch
        mine = batch[dist.rank_slice(len(batch))]
        total = 0.0
        for sl in dist.micro_slices(len(batch), micro):  # (what dist.accumulate does, with the per-rank variant)
            items = batch[sl] or batch[:1]
            loss = nll(model, items)
            if per_rank_mean:  # the mean of per-rank means: what the test shows to be wrong
                loss = loss / sum(len(s) - p for s, p in mine) / dist.world_size()
            else:
                loss = loss / n_global
            loss = loss * (1.0 if batch[sl] else 0.0)
            loss.backward()
            total += float(loss.detach())
        norm = dist.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((dist.all_sum(total), norm))
    return out


def make(state_dir: Path | None = None):
    model = par.parallelize(tiny_llama())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    if state_dir is not None:
        dist.load_state(state_dir, {"model": model}, opt)
    return model, opt


def generate(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from rlhf_fast.rollout import RolloutEngine, SamplingParams

    mine = dist.rank_slice(len(prompts))
    with par.unsharded(model), torch.no_grad():  # no collective while decoding
        comps = RolloutEngine(model).generate(prompts[mine], SamplingParams(max_new_tokens=max_new, seed=3),
                                              first_index=mine.start)
    return [c.token_ids for c in comps]


def run(out: Path, peer: Path | None) -> dict:
    """Everything one world does; `peer` holds the other world's checkpoint to resume from (1 -> 2 / 2 -> 1)."""
    torch.set_num_threads(1)
    res: dict = {}
    data = batches()
    model, opt = make()
    res["steps"] = train(model, opt, data[:2])
    dist.save_state(out / f"ckpt{dist.world_size()}", {"model": model}, opt)
    res["steps"] += train(model, opt, data[2:])
    res["final"] = {k: v.clone() for k, v in dist.full_state_dict(model).items()}
    save_model(model, out / f"export{dist.world_size()}")
    res["per_rank_mean"] = train(*make(), data[:2], per_rank_mean=True)
    if peer is not None:  # resume the other world's checkpoint here and take the last step
        model, opt = make(peer)
        res["resumed_steps"] = train(model, opt, data[2:])
        res["resumed_final"] = {k: v.clone() for k, v in dist.full_state_dict(model).items()}
    g = torch.Generator().manual_seed(11)
    x, m = torch.randn(10, 7, generator=g), (torch.rand(10, 7, generator=g) > 0.3).float()
    part = dist.rank_slice(10)
    res["moments"] = [float(v) for v in dist.masked_moments(x[part], m[part])]
    prompts = [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in (3, 9, 5, 12)]
    res["tokens"] = generate(model, prompts, max_new=4 + 10 * dist.rank())  # uneven lengths across ranks
    res["after_generate"] = dist.all_sum(1)  # a collective after uneven decoding: nobody hung
    return res


def main() -> None:
    """Under torchrun: the module checks, then the stages (`tests/_dist_stages.py`), in one launch."""
    from tests import _dist_stages

    out = Path(sys.argv[1])
    dist.init(timeout_s=300)
    res = run(out, out / "ckpt1")
    torch.save(res, out / f"rank{dist.rank()}.pt")
    _dist_stages.run_world(out / "stages")


if __name__ == "__main__":
    main()
