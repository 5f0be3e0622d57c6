"""Per-rank memory of large policies under tensor parallelism (tp) x FSDP2 (dp), on paper, from formulas checked
against measured per-rank bytes.

    python -m bench.memory_model                     # check + the 70B dense and 30B-A3B MoE tables
    python -m bench.memory_model --check-only        # only the check against bench/results/scaling_tp*.json

The formulas (`local_numel`): each parameter tensor of a decoder is what `parallelize.tensor_parallel` does to it
(q/k/v, gate/up and the lm_head split by output rows over tp, o and down by input columns, the embedding by
vocabulary rows, an MoE layer's stacked experts by whole experts; norms, a Qwen3 q/k norm, an MoE router and a
scalar head replicated), then FSDP2 `fully_shard`
over the dp ranks: dim 0 of the rank's tp shard in `torch.chunk` pieces (ceil(d0 / dp) rows; the last ranks may hold
fewer, a (1, hidden) head's whole row sits on dp rank 0). Parameters, gradients and AdamW's two moments are that
many elements each; AdamW adds one 4-byte step counter per tensor. `check_measured` compares the prediction with
`bench/bench_scaling.py --tp`'s measurement of the actual local shards, rank by rank, and prints both.

The large-model table (`plan`) applies the same per-tensor formula to a Llama-3-70B-shaped dense policy and a
Qwen3-30B-A3B-shaped MoE on 80 GiB devices, per phase of a PPO/GRPO iteration; its assumptions are in ASSUMPTIONS.
Whether our code runs a layout is asked of the code (`tp_refusal`: `parallelize._check_tp` on the model built on
the meta device), not written down here.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Arch:
    """A decoder's shape. `experts` > 0: every layer's MLP is a mixture of `experts` gated MLPs of width `moe_ffn`,
    `top_k` of them per token, and a router (E, hidden)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int = 0
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False
    qk_norm: bool = False  # Qwen3: a (head_dim,) RMSNorm on q and on k per layer
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_bench(cls, arch: dict, name: str = "bench") -> "Arch":
        """bench/bench_scaling.py's arch dict (a Llama)."""
        return cls(name, arch["vocab"], arch["hidden"], arch["layers"], arch["heads"], arch["kv_heads"],
                   arch["ffn"], tied=arch["tied"], head_dim=arch.get("head_dim", 0),
                   qk_norm=arch.get("qk_norm", False), experts=arch.get("experts", 0), top_k=arch.get("top_k", 0),
                   moe_ffn=arch.get("moe_ffn", 0))


LLAMA3_70B = Arch("Llama-3-70B-shaped dense", vocab=128256, hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672)
QWEN3_30B_A3B = Arch("Qwen3-30B-A3B-shaped MoE", vocab=151936, hidden=2048, layers=48, heads=32, kv_heads=4,
                     head_dim=128, qk_norm=True, experts=128, top_k=8, moe_ffn=768)


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    split: int | None  # the dim tensor_parallel splits over tp (None: replicated on every tp rank)


def tensors(a: Arch, *, lm_head: bool = True, scalar_head: bool = False, tp: int = 1) -> list[Tensor]:
    """The parameter tensors of `a` as our models hold them (nn.Linear weights (out, in); stacked experts
    gate_up (E, 2F, H) and down (E, H, F)), with the dim tensor parallelism splits. `lm_head=False`: a backbone
    (value / reward model); `scalar_head`: plus `head` Linear(hidden, 1) with a bias, replicated. `tp`: the split
    the tensors are for: at tp > kv_heads (a multiple of them) `tensor_parallel` replicates the kv heads, so
    k_proj / v_proj stay whole on every tp rank (each rank computes the one kv head its query heads read)."""
    h, hd = a.hidden, a.hd
    kv_split = 0 if tp <= a.kv_heads else None
    out = [Tensor("embed.weight", (a.vocab, h), 0)]
    for i in range(a.layers):
        p = f"layers.{i}."
        out += [Tensor(p + "attn_norm.weight", (h,), None),
                Tensor(p + "attn.q_proj.weight", (a.heads * hd, h), 0),
                Tensor(p + "attn.k_proj.weight", (a.kv_heads * hd, h), kv_split),
                Tensor(p + "attn.v_proj.weight", (a.kv_heads * hd, h), kv_split),
                Tensor(p + "attn.o_proj.weight", (h, a.heads * hd), 1),
                Tensor(p + "mlp_norm.weight", (h,), None)]
        if a.qk_norm:
            out += [Tensor(p + "attn.q_norm.weight", (hd,), None), Tensor(p + "attn.k_norm.weight", (hd,), None)]
        if a.experts:  # whole experts over the tp ranks (E / tp each), the router whole on every rank
            out += [Tensor(p + "mlp.router.weight", (a.experts, h), None),
                    Tensor(p + "mlp.experts.gate_up_proj", (a.experts, 2 * a.moe_ffn, h), 0),
                    Tensor(p + "mlp.experts.down_proj", (a.experts, h, a.moe_ffn), 0)]
        else:
            out += [Tensor(p + "mlp.gate_proj.weight", (a.ffn, h), 0), Tensor(p + "mlp.up_proj.weight", (a.ffn, h), 0),
                    Tensor(p + "mlp.down_proj.weight", (h, a.ffn), 1)]
    out.append(Tensor("norm.weight", (h,), None))
    if lm_head and not a.tied:
        out.append(Tensor("lm_head.weight", (a.vocab, h), 0))
    if scalar_head:
        out += [Tensor("head.weight", (1, h), None), Tensor("head.bias", (1,), None)]
    return out


def numel(ts: list[Tensor]) -> int:
    return sum(math.prod(t.shape) for t in ts)


class Refused(ValueError):
    """A layout our code refuses (the message is the reason)."""


def hf_config(a: Arch):
    """A transformers config of `a`'s shape (Llama, Qwen3, or Qwen3-MoE), for building it on the meta device."""
    import transformers

    kw = dict(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
              num_key_value_heads=a.kv_heads, tie_word_embeddings=a.tied, max_position_embeddings=8192)
    if a.experts:
        return transformers.Qwen3MoeConfig(intermediate_size=a.moe_ffn, moe_intermediate_size=a.moe_ffn,
                                           num_experts=a.experts, num_experts_per_tok=a.top_k, head_dim=a.hd, **kw)
    if a.qk_norm:
        return transformers.Qwen3Config(intermediate_size=a.ffn, head_dim=a.hd, **kw)
    return transformers.LlamaConfig(intermediate_size=a.ffn, head_dim=a.hd, **kw)


@functools.lru_cache(maxsize=None)
def tp_refusal(a: Arch, tp: int) -> str:
    """What our code says to splitting `a` over `tp` ranks: "" when `parallelize.tensor_parallel` splits it, else
    its one-line ConfigError, from the code itself (`parallelize._check_tp` on `a` built on the meta device, no
    storage), so the table follows what `tensor_parallel` covers today."""
    from rlhf_fast import parallelize
    from rlhf_fast.config import ConfigError
    from rlhf_fast.models import build_model

    if tp == 1:
        return ""
    try:
        parallelize._check_tp(build_model(hf_config(a), device="meta"), tp)
    except ConfigError as e:
        return str(e)
    return ""


def local_numel(t: Tensor, tp: int, dp: int, dp_rank: int = 0, *, check: bool = True) -> int:
    """Elements of `t` one rank holds: its tp shard (1/tp along `t.split`), then FSDP2's `torch.chunk` piece of
    dim 0 of that over `dp` ranks (ceil(d0 / dp) rows; rank `dp_rank` gets what is left of them)."""
    shape = list(t.shape)
    if t.split is not None and tp > 1:
        if check and shape[t.split] % tp:
            raise Refused(f"{t.name}: dim {t.split} of {tuple(t.shape)} is not divisible by tp {tp}")
        shape[t.split] = -(-shape[t.split] // tp)
    if dp > 1:
        chunk = -(-shape[0] // dp)
        shape[0] = max(0, min(chunk, shape[0] - dp_rank * chunk))
    return math.prod(shape)


def per_rank_elements(ts: list[Tensor], tp: int, dp: int, dp_rank: int = 0, *, check: bool = True) -> int:
    return sum(local_numel(t, tp, dp, dp_rank, check=check) for t in ts)


# --- the check against measured per-rank bytes -------------------------------------------------------------------


def predict_bench_row(arch: dict, world: int, tp: int) -> dict:
    """What bench_scaling's tp worker should measure on each rank (fp32): parameter, gradient, AdamW moment and
    step-counter bytes of the untied/tied policy, and the reward model's (scalar head) parameter bytes, per rank
    r = dp_rank * tp + tp_rank (the tp ranks of a group hold equally much)."""
    a = Arch.from_bench(arch)
    dp = world // tp
    pol, rm = tensors(a, tp=tp), tensors(a, lm_head=False, scalar_head=True, tp=tp)
    params = [4 * per_rank_elements(pol, tp, dp, r // tp) for r in range(world)]
    return {"params_B_ranks": params, "grads_B_ranks": params, "optim_moments_B_ranks": [2 * p for p in params],
            "optim_step_B": 4 * len(pol),
            "rm_params_B_ranks": [4 * per_rank_elements(rm, tp, dp, r // tp) for r in range(world)]}


def check_measured(paths: list[Path], *, verbose: bool = True) -> list[dict]:
    """For every row of bench_scaling --tp results at `paths`: the measured per-rank bytes beside the formula's.
    Returns one dict per row (measured, predicted, equal); prints them."""
    out = []
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            arch = json.loads(row["arch"])
            pred = predict_bench_row(arch, row["world_size"], row["tp"])
            got = {"params_B_ranks": [int(x) for x in str(row["params_B_ranks"]).split("/")],
                   "rm_params_B_ranks": [int(x) for x in str(row["rm_params_B_ranks"]).split("/")],
                   "grads_B": row["grads_B_per_rank"], "optim_moments_B": row["optim_moments_B_per_rank"],
                   "optim_step_B": row["optim_step_B_per_rank"]}
            want = {"params_B_ranks": pred["params_B_ranks"], "rm_params_B_ranks": pred["rm_params_B_ranks"],
                    "grads_B": max(pred["grads_B_ranks"]), "optim_moments_B": max(pred["optim_moments_B_ranks"]),
                    "optim_step_B": pred["optim_step_B"]}
            if row.get("kv_B_per_token_per_rank") not in (None, ""):  # the engine ran on this layout
                got["kv_B_per_token"] = row["kv_B_per_token_per_rank"]
                want["kv_B_per_token"] = kv_bytes_per_token(Arch.from_bench(arch), row["tp"], elem=4)
            res = {"source": Path(path).name, "case": row["case"], "arch": row["arch"], "measured": got,
                   "predicted": want, "equal": got == want}
            out.append(res)
            if verbose:
                print(f"[check] {res['source']} {row['case']} arch {row['arch']}:\n"
                      f"   measured  policy params/rank {got['params_B_ranks']} B, grads {got['grads_B']}, AdamW "
                      f"moments {got['optim_moments_B']} + steps {got['optim_step_B']}; RM params "
                      f"{got['rm_params_B_ranks']}; KV per token {got.get('kv_B_per_token', 'n/a')}\n"
                      f"   formula   policy params/rank {want['params_B_ranks']} B, grads {want['grads_B']}, AdamW "
                      f"moments {want['optim_moments_B']} + steps {want['optim_step_B']}; RM params "
                      f"{want['rm_params_B_ranks']}; KV per token {want.get('kv_B_per_token', 'n/a')}  -> "
                      f"{'EQUAL' if res['equal'] else 'DIFFERENT'}")
    return out


# --- the large-model plan ------------------------------------------------------------------------------------------

DEVICE_GIB = 80.0  # an 80 GB H100 / A100 (they report 79.1-79.6 GiB usable)
RESERVED_GIB = 6.0  # CUDA context, NCCL buffers, allocator fragmentation: not available to tensors
ROLLOUTS, ROLLOUT_TOKENS = 256, 8192  # 256 rollouts of 8k tokens (prompt + response) each
MICRO_TOKENS = 8192  # tokens per rank per micro-batch in the update (one rollout)
LOGPROB_CHUNK = 4096  # rows per chunk of the vocab-parallel log-probs (logits never whole)

ASSUMPTIONS = [
    f"{DEVICE_GIB:.0f} GiB per device, {RESERVED_GIB:.0f} GiB of it reserved (CUDA context, NCCL, fragmentation)",
    "trainable models (policy; PPO's value model, the policy's backbone + a scalar head): fp32 master weights, "
    "fp32 gradients, AdamW's two fp32 moments (16 B per parameter), FSDP2-sharded over dp after the tp split; "
    "FSDP mixed precision gathers bf16 weights for compute (a stage's mixed_precision=bf16)",
    "frozen models (reference = the policy's shape; PPO's reward model = the value model's shape) held in bf16 "
    "(ppo.model_dtype=bf16) and sharded like the policy (parallel.shard_frozen=true)",
    "gradients exist only during the update (zero_grad(set_to_none)); the rollout phase holds the policy "
    "gathered over dp (`parallelize.unsharded`: its whole tp shard, bf16) plus the KV cache",
    f"the update: per-block activation checkpointing, a micro-batch of {MICRO_TOKENS} tokens per rank: the saved "
    "block inputs (layers x tokens x hidden, bf16, replicated over tp: no sequence parallelism), one block's "
    "recompute working set (x2 for its backward), two blocks gathered by FSDP (bf16) and one block's fp32 gradients "
    "before the reduce-scatter, the root (embedding, lm_head) gathered for the whole pass, the vocab-parallel "
    f"log-probs in chunks of {LOGPROB_CHUNK} rows (fp32 logits of V / tp columns, and their gradient)",
    f"KV cache: {ROLLOUTS} rollouts x {ROLLOUT_TOKENS} tokens, bf16, each dp group decoding {ROLLOUTS} / dp of "
    "them at once, every tp rank holding its kv_heads / tp heads of every layer (one, replicated, where tp is a "
    "multiple of kv_heads: k_proj / v_proj then whole on every tp rank)",
]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What runs colocated on the ranks: `grpo` = policy + reference (rewards from a function);
    `ppo` = policy + value model (trainable) + reference + reward model (frozen)."""

    name: str
    value: bool
    reward: bool


GRPO = Setup("GRPO (policy + ref)", value=False, reward=False)
PPO = Setup("PPO (policy + value + ref + reward)", value=True, reward=True)


def kv_bytes_per_token(a: Arch, tp: int, *, elem: int = 2) -> int:
    """K and V of one token, every layer, the kv heads one tp rank holds (kv_heads / tp; one where tp is a multiple
    of kv_heads: replicated), bf16."""
    if a.kv_heads % tp and tp % a.kv_heads:
        raise Refused(f"parallel.tp: {tp} must divide the model's num_kv_heads {a.kv_heads} or be a multiple of it")
    return 2 * a.layers * max(1, a.kv_heads // tp) * a.hd * elem


def _block(ts: list[Tensor], i: int) -> list[Tensor]:
    return [t for t in ts if t.name.startswith(f"layers.{i}.")]


def _root(ts: list[Tensor]) -> list[Tensor]:
    return [t for t in ts if not t.name.startswith("layers.")]


def plan_row(a: Arch, setup: Setup, tp: int, dp: int) -> dict:
    """Per-rank GiB of each part in each phase of an iteration, the peak and whether it fits; `refused` says why
    our code does not run the layout (the numbers are then what it would take)."""
    refused = tp_refusal(a, tp)
    pol = tensors(a, tp=tp)
    val = tensors(a, lm_head=False, scalar_head=True, tp=tp)
    n_pol, n_val = per_rank_elements(pol, tp, dp, check=False), per_rank_elements(val, tp, dp, check=False)
    tp_pol = per_rank_elements(pol, tp, 1, check=False)  # the policy's whole tp shard (gathered over dp)
    g = GiB
    trainable = 12 * n_pol + (12 * n_val if setup.value else 0)  # master + two moments, sharded
    frozen = 2 * n_pol + (2 * n_val if setup.reward else 0)  # reference (+ reward), bf16, sharded
    resident = trainable + frozen
    # rollout: the policy gathered (bf16), the KV cache of this dp group's rollouts
    kv_tok = 2 * a.layers * max(1, a.kv_heads // tp) * a.hd * 2  # one replicated kv head per rank at tp > kv heads
    seqs = -(-ROLLOUTS // dp)
    kv = seqs * ROLLOUT_TOKENS * kv_tok
    rollout = resident + 2 * tp_pol + kv
    # update: gradients (fp32, sharded) + FSDP transients + activations
    blk = per_rank_elements(_block(pol, 0), tp, 1, check=False)
    root = per_rank_elements(_root(pol), tp, 1, check=False)
    fsdp = 2 * 2 * blk + 4 * blk + 2 * root
    m = MICRO_TOKENS
    ffn_act = a.top_k * a.moe_ffn if a.experts else a.ffn
    saved = a.layers * m * a.hidden * 2
    work = 2 * m * (6 * a.hidden + (2 * a.heads // tp + 2 * max(1, a.kv_heads // tp)) * a.hd + 3 * ffn_act // tp) * 2
    logits = 2 * LOGPROB_CHUNK * (a.vocab // tp) * 4
    acts = saved + work + logits
    grads = 4 * n_pol + (4 * n_val if setup.value else 0)
    update = resident + grads + fsdp + acts
    budget = DEVICE_GIB - RESERVED_GIB
    peak = max(rollout, update) / g
    free_for_kv = budget * g - (resident + 2 * tp_pol)
    max_seqs = min(seqs, max(0, int(free_for_kv // (ROLLOUT_TOKENS * kv_tok))))
    fits = update <= budget * g and max_seqs >= 1  # the engine decodes what its KV pool holds, the rest after
    return {"model": a.name, "setup": setup.name, "tp": tp, "dp": dp, "gpus": tp * dp,
            "params_B": round((numel(pol) + (numel(val) if setup.value else 0)) / 1e9, 2),
            "trainable_states_GiB": round(trainable / g, 2), "frozen_GiB": round(frozen / g, 2),
            "policy_gathered_bf16_GiB": round(2 * tp_pol / g, 2),
            "kv_KiB_per_token": round(kv_tok / 1024, 2), "rollouts_per_dp_group": seqs,
            "kv_GiB": round(kv / g, 2), "rollout_phase_GiB": round(rollout / g, 2),
            "grads_GiB": round(grads / g, 2), "fsdp_transient_GiB": round(fsdp / g, 2),
            "activations_GiB": round(acts / g, 2), "update_phase_GiB": round(update / g, 2),
            "peak_GiB": round(peak, 2), "budget_GiB": budget, "fits": "yes" if fits else "no",
            "rollouts_at_once_per_dp_group": max_seqs, "all_rollouts_at_once": "yes" if peak <= budget else "no",
            "runs_today": "no" if refused else "yes",
            "refused": refused}


def plan() -> list[dict]:
    rows = []
    for setup in (GRPO, PPO):
        for dp in (1, 2, 4, 8):
            rows.append(plan_row(LLAMA3_70B, setup, 8, dp))
    for setup in (GRPO, PPO):
        for tp, dps in ((1, (8, 16, 32, 64)), (4, (2, 4, 8)), (8, (1, 2, 4))):
            for dp in dps:
                rows.append(plan_row(QWEN3_30B_A3B, setup, tp, dp))
    return rows


def markdown(rows: list[dict]) -> str:
    """The plan as a compact Markdown table (GiB per rank)."""
    lines = ["| model | setup | tp x dp (GPUs) | states: trainable + frozen | policy gathered (bf16) | KV: rollouts "
             "per dp group, GiB | rollout phase | update phase | fits 74 GiB | rollouts at once per dp group | our "
             "code |", "|" + "---|" * 11]
    for r in rows:
        today = "runs" if r["runs_today"] == "yes" else "refuses: " + r["refused"].split(" (replicated")[0]
        lines.append(f"| {r['model'].split('-shaped')[0]} | {r['setup'].split(' (')[0]} | {r['tp']} x {r['dp']} "
                     f"({r['gpus']}) | {r['trainable_states_GiB']} + {r['frozen_GiB']} | "
                     f"{r['policy_gathered_bf16_GiB']} | {r['rollouts_per_dp_group']}: {r['kv_GiB']} | "
                     f"{r['rollout_phase_GiB']} | {r['update_phase_GiB']} | **{r['fits']}** | "
                     f"{r['rollouts_at_once_per_dp_group']} | {today} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-only", action="store_true", help="only compare the formula with measured bytes")
    ap.add_argument("--measured", nargs="*", type=Path, default=None,
                    help="bench_scaling --tp results (default: bench/results/scaling_tp*.json)")
    args = ap.parse_args(argv)
    from bench.harness import RESULTS_DIR, write_results

    paths = args.measured if args.measured is not None else sorted(RESULTS_DIR.glob("scaling_tp*.json"))
    checks = check_measured(paths)
    bad = [c for c in checks if not c["equal"]]
    print(f"[check] {len(checks) - len(bad)} of {len(checks)} measured rows equal the formula")
    if args.check_only:
        return 1 if bad or not checks else 0
    rows = plan()
    for r in rows:
        r["device"] = f"on paper: {DEVICE_GIB:.0f} GiB devices"
    write_results("memory_model", rows)
    print(markdown(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
