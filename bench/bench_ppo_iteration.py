"""One PPO iteration end to end, split by phase: rlhf_fast's `PPOTrainer` vs a plain TRL-style loop.

    flock /tmp/rlhf_bench.lock python -m bench.bench_ppo_iteration [--vocab 32000] [--quick] [--gpu]

A randomly initialised Llama (vocab `--vocab`, hidden 256, 4 layers, GQA 4/2) as policy, frozen reference, value
and reward model; 16 prompts (random tokens, lengths around `--prompt-len`) x 4 samples x 64 new tokens (no stop
token: both sides generate exactly the same number of tokens), 2 PPO epochs of minibatch 32, AdamW, clip 0.2,
value clip 0.2, vf_coef 0.5, KL 0.05 in the reward, GAE gamma 1 lambda 0.95 with whitened advantages.

  * trl-style: the loop as TRL / OpenRLHF / verl write it, here in the bench: HF `generate`; the policy,
    reference, value and reward passes as padded HF forwards (left-padded prompts, position ids from the mask); full
    logits -> log_softmax -> gather; rewards and GAE in a reversed Python loop; the same losses in plain PyTorch
    and the same AdamW. Value and reward models are HF backbones + a Linear head (no lm_head), as in TRL.
  * rlhf_fast: `PPOTrainer(cfg, policy, value, ref, reward_model, tokenizer).iteration(prompts, k)` on rlhf_fast's
    own models (`DecoderLM`, what `models.load_model` gives the stages), holding the very weights of the loop's HF
    models: each HF Llama is built from the same seed, then its state dict is loaded into `build_model(config)`
    under our names (`harness.owned_model`). Value and reward models are `ScalarHeadModel(backbone)` (the head
    its own init).

Both sides run interleaved iteration by iteration (after a small warm-up each), so the machine's load hits both.
Time and memory are measured apart: the timed iterations run with the allocator's default settings, and on CPU each
side's peak memory comes from one more iteration in a fresh process whose allocator frees at once (mmap for every
allocation over 128 KiB), which makes the resident set follow live memory but slows the process down (measured:
rlhf_fast's iteration 45% slower, the loop's 22%), so no timing is taken there.
Rows (bench/results/ppo_iteration_v<vocab>[_gpu][_t<threads>].{csv,json,png}): one per (side, phase) with the
median seconds, the speedup (trl-style / rlhf_fast) and, on the total row, generated tokens and peak extra memory
per iteration (rlhf_fast's includes the KV blocks its engine used); an `old_logp_reuse` row: the max |difference|
between the reused rollout log-probs and a recompute by the training forward (`ppo.old_logp: check`, one collect);
and a `prompt_sharing` row: one forward + backward of the policy over n = 8 samples of prompts as long as their
responses, shared-prompt vs per-sample packing (tokens and time ratio).

`bench_iteration(...)` is the function behind the CLI (helper scripts such as `bench/gpu_check.py` call it).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import types

import torch

from bench.harness import device_name, owned_model, peak_extra_memory, write_results
from rlhf_fast.config import KLConfig, OptimConfig, PPOConfig, SamplingConfig
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.stages.ppo import PPOTrainer

PHASES = ("time_generate", "time_score", "time_advantages", "time_update")
NAMES = {"time_generate": "generate", "time_score": "score", "time_advantages": "advantages",
         "time_update": "update"}


def llama(vocab: int, hidden: int, layers: int, seed: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None  # no stop token: every response is max_new_tokens long
    return model.eval()


class ValueHead(torch.nn.Module):
    """The baseline's value / reward model: an HF backbone + Linear(hidden, 1) (TRL's `AutoModelForSequence...`)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.score = torch.nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype, device=backbone.device)

    def forward(self, ids, attn, pos):
        h = self.backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        return self.score(h).squeeze(-1).float()  # (B, T)


class TRLStyleLoop:
    """A plain PPO iteration, written the way the common trainers ship it (see the module docstring)."""

    def __init__(self, cfg: PPOConfig, policy, ref, value: ValueHead, reward: ValueHead, pad_id: int,
                 micro_batch: int | None = None):
        self.cfg, self.policy, self.ref, self.value, self.reward, self.pad = cfg, policy, ref, value, reward, pad_id
        self.micro = micro_batch or cfg.minibatch_size  # forward chunk / gradient-accumulation step (memory)
        params = [p for p in policy.parameters()] + [p for p in value.parameters()]
        self.opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                     weight_decay=cfg.optim.weight_decay)

    def logprobs(self, model, ids, attn, pos, ctx):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
        logits = logits[:, ctx - 1:-1].float() / self.cfg.sampling.temperature  # (B, R, V)
        return torch.gather(logits.log_softmax(-1), 2, ids[:, ctx:, None]).squeeze(-1)  # (B, R)

    def iteration(self, prompts: list[list[int]], it: int) -> dict:
        c, dev = self.cfg, self.policy.device
        t0 = time.perf_counter()
        ctx = max(map(len, prompts))
        q = torch.full((len(prompts), ctx), self.pad, dtype=torch.long)
        qa = torch.zeros_like(q)
        for i, p in enumerate(prompts):  # left-padded queries
            q[i, ctx - len(p):], qa[i, ctx - len(p):] = torch.tensor(p), 1
        torch.manual_seed(c.seed + it)
        with torch.no_grad():
            out = self.policy.generate(input_ids=q.to(dev), attention_mask=qa.to(dev), do_sample=True,
                                       max_new_tokens=c.sampling.max_new_tokens, temperature=c.sampling.temperature,
                                       top_k=0, top_p=1.0, num_return_sequences=c.sampling.n,
                                       pad_token_id=self.pad, eos_token_id=None)
        ids = out  # (N, ctx + R): every response has max_new_tokens tokens (no stop token)
        attn = torch.cat((qa.to(dev).repeat_interleave(c.sampling.n, 0), torch.ones_like(ids[:, ctx:])), 1)
        pos = (attn.cumsum(1) - attn).clamp(min=0)
        t1 = time.perf_counter()
        mb, micro = c.minibatch_size, self.micro
        with torch.no_grad():
            old_logp, ref_logp, values, scores = [], [], [], []
            for s in range(0, ids.shape[0], micro):
                a, m, p = ids[s:s + micro], attn[s:s + micro], pos[s:s + micro]
                old_logp.append(self.logprobs(self.policy, a, m, p, ctx))
                ref_logp.append(self.logprobs(self.ref, a, m, p, ctx))
                values.append(self.value(a, m, p)[:, ctx - 1:-1])
                scores.append(self.reward(a, m, p)[:, -1])
            old_logp, ref_logp, values, scores = (torch.cat(x) for x in (old_logp, ref_logp, values, scores))
        t2 = time.perf_counter()
        with torch.no_grad():
            rewards = -c.kl.coef * (old_logp - ref_logp)
            rewards[:, -1] += scores
            last, adv_rev = 0.0, []
            for t in reversed(range(rewards.shape[1])):  # GAE, the reversed Python loop
                nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
                delta = rewards[:, t] + c.gamma * nxt - values[:, t]
                last = delta + c.gamma * c.lam * last
                adv_rev.append(last)
            adv = torch.stack(adv_rev[::-1], 1)
            returns = adv + values
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        t3 = time.perf_counter()
        self.policy.train()
        self.value.train()
        g = torch.Generator().manual_seed(c.seed * 7919 + it)
        for _ in range(c.ppo_epochs):
            perm = torch.randperm(ids.shape[0], generator=g)
            for s in range(0, ids.shape[0], mb):
                sel = perm[s:s + mb].to(dev)
                for i in sel.split(micro):  # gradient accumulation over micro-batches (one when micro >= mb)
                    a, m, p = ids[i], attn[i], pos[i]
                    logp = self.logprobs(self.policy, a, m, p, ctx)
                    ratio = torch.exp(logp - old_logp[i])
                    pg = torch.max(-adv[i] * ratio, -adv[i] * ratio.clamp(1 - c.clip, 1 + c.clip)).mean()
                    v = self.value(a, m, p)[:, ctx - 1:-1]
                    vc = values[i] + (v - values[i]).clamp(-c.value_clip, c.value_clip)
                    vf = 0.5 * torch.max((v - returns[i]) ** 2, (vc - returns[i]) ** 2).mean()
                    ((pg + c.vf_coef * vf) * (len(i) / len(sel))).backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.optim.grad_clip)
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), c.optim.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        self.policy.eval()
        self.value.eval()
        t4 = time.perf_counter()
        return {"time_generate": t1 - t0, "time_score": t2 - t1, "time_advantages": t3 - t2,
                "time_update": t4 - t3, "generated_tokens": float(ids[:, ctx:].numel())}


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, 3 * length // 4), 5 * length // 4 + 1, (num,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lens]


def prompt_sharing(policy, vocab: int, length: int, n: int = 8, groups: int = 4, reps: int = 3) -> dict:
    """Forward + backward of the policy over `groups` prompts x `n` samples (prompt and response `length` tokens):
    shared-prompt vs per-sample packing, interleaved, `reps` timed runs each after a warm-up, the fastest kept (one
    run each moved the ratio by +-0.1 on this machine). Returns the token and time ratios."""
    from rlhf_fast.models.packed import pack, packed_hidden

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(groups)]
    seq_prompts = [p for p in prompts for _ in range(n)]
    responses = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in seq_prompts]
    gid = [i // n for i in range(len(seq_prompts))]
    times, tokens = {False: [], True: []}, {}
    for share in (False, True) * (reps + 1):  # interleaved; the first of each warms up
        b = pack(seq_prompts, responses, groups=gid, share_prompts=share, device=policy.device)
        t0 = time.perf_counter()
        packed_hidden(policy, b).float().square().mean().backward()
        _sync(policy.device)
        times[share].append(time.perf_counter() - t0)
        tokens[share] = b.num_tokens
        policy.zero_grad(set_to_none=True)
    times = {k: min(v[1:]) for k, v in times.items()}
    return {"tokens_ratio": tokens[True] / tokens[False], "time_ratio": times[True] / times[False],
            "time_shared_s": times[True], "time_per_sample_s": times[False]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(num_prompts: int, n_samples: int, new_tokens: int, device: str) -> PPOConfig:
    return PPOConfig(prompts_per_iter=num_prompts, sampling=SamplingConfig(n=n_samples, max_new_tokens=new_tokens),
                     ppo_epochs=2, minibatch_size=32, kl=KLConfig(coef=0.05),
                     optim=OptimConfig(lr=1e-6, schedule="constant"), max_len=512, device=device)


TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=-1, bos_token_id=None)  # no stop: full-length replies


def make_side(name: str, cfg: PPOConfig, vocab: int, hidden: int, layers: int, micro_batch: int | None):
    """One side of the comparison, its models built from the same seeds on both sides (bf16 on CUDA): rlhf_fast's
    are its own models holding the HF models' weights (`owned_model`); the scalar heads are each side's own
    initialisation (the phases' work does not depend on their values: no stop token)."""
    device = cfg.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    build = lambda seed: llama(vocab, hidden, layers, seed, dtype, device)  # noqa: E731
    if name == "rlhf_fast":
        def scalar(seed: int) -> ScalarHeadModel:
            return ScalarHeadModel(owned_model(build(seed), lm_head=False)).to(device=device, dtype=dtype)

        return PPOTrainer(cfg, owned_model(build(0)), scalar(1), owned_model(build(0)).requires_grad_(False),
                          scalar(1).requires_grad_(False), TOKENIZER)
    return TRLStyleLoop(cfg, build(0), build(0).requires_grad_(False), ValueHead(build(1).model),
                        ValueHead(build(1).model).requires_grad_(False), pad_id=0, micro_batch=micro_batch)


def kv_bytes(side) -> int:
    """The KV blocks rlhf_fast's engine used at most (its pool outlives the call); 0 for the loop."""
    return getattr(getattr(getattr(side, "generator", None), "stats", None), "peak_kv_bytes", 0)


def side_peak(name: str, cfg: PPOConfig, batches, model_kw: dict) -> int:
    """Peak extra memory of one iteration of side `name` (after its warm-up); rlhf_fast's includes the KV blocks
    its engine used (the pool outlives the call)."""
    side = make_side(name, cfg, **model_kw)
    side.iteration(batches[0][:2], 0)
    peak = peak_extra_memory(lambda: side.iteration(batches[1], 1), cfg.device)
    return peak + kv_bytes(side)


def _child_peak(conn, name, cfg, batches, model_kw, threads) -> None:
    torch.set_num_threads(threads)
    exact_cpu_peaks()
    conn.send(side_peak(name, cfg, batches, model_kw))
    conn.close()


def cpu_peak_in_child(name: str, cfg: PPOConfig, batches, model_kw: dict) -> int:
    """`side_peak` in a fresh spawned process whose allocator returns freed memory at once (`exact_cpu_peaks`), so
    the resident-set peak follows live memory; the timed iterations keep glibc's default (much faster) settings."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_peak, args=(send, name, cfg, batches, model_kw, torch.get_num_threads()))
    proc.start()
    send.close()
    try:
        peak = recv.recv()
    except EOFError:
        peak = None
    proc.join()
    if peak is None or proc.exitcode != 0:
        raise RuntimeError(f"the peak-memory process of {name} failed (exit {proc.exitcode})")
    return peak


def bench_iteration(*, vocab: int = 32000, hidden: int = 256, layers: int = 4, num_prompts: int = 16,
                    n_samples: int = 4, new_tokens: int = 64, prompt_len: int = 64, iters: int = 1,
                    device: str = "cpu", micro_batch: int | None = None) -> list[dict]:
    """Run both sides interleaved; returns the result rows (see the module docstring). bf16 on CUDA.

    Timing and memory are measured apart: the timed iterations run here with the allocator's default settings;
    on CPU each side's peak comes from one more iteration in a fresh process (`cpu_peak_in_child`), on CUDA from
    the allocator's peak statistics of the first measured iteration."""
    cfg = _config(num_prompts, n_samples, new_tokens, device)
    model_kw = dict(vocab=vocab, hidden=hidden, layers=layers, micro_batch=micro_batch)
    batches = [make_prompts(num_prompts, prompt_len, vocab, seed=i) for i in range(iters + 2)]
    names = ("rlhf_fast", "trl-style")
    peaks: dict[str, int] = {}
    if device == "cpu":
        for name in names:
            peaks[name] = cpu_peak_in_child(name, cfg, batches, model_kw)
    sides = {name: make_side(name, cfg, **model_kw) for name in names}
    ours, base = sides["rlhf_fast"], sides["trl-style"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for name, side in sides.items():
        side.iteration(batches[0][:2], 0)  # warm-up (2 prompts)
    for i in range(1, iters + 1):  # interleaved
        for name, side in sides.items():
            if name in peaks:
                runs[name].append(side.iteration(batches[i], i))
                continue
            box: list[dict] = []
            peaks[name] = peak_extra_memory(lambda s=side, b=box: b.append(s.iteration(batches[i], i)), device)
            peaks[name] += kv_bytes(side)
            runs[name].append(box[0])
    med = {n: {k: statistics.median(r[k] for r in rs) for k in (*PHASES, "generated_tokens")} for n, rs in runs.items()}
    for m in med.values():
        m["time_total"] = sum(m[k] for k in PHASES)
    dev_name = device_name(device)
    dtype = str(next(ours.policy.parameters()).dtype).removeprefix("torch.")
    rows = []
    for name in ("trl-style", "rlhf_fast"):
        for key in (*PHASES, "time_total"):
            row = {"case": name, "phase": NAMES.get(key, "total"), "time_s": round(med[name][key], 3),
                   "speedup": round(med["trl-style"][key] / med[name][key], 2) if med[name][key] > 0 else "",
                   "vocab": vocab, "hidden": hidden, "layers": layers, "dtype": dtype,
                   "device": dev_name, "iterations": len(runs[name]),
                   "trl_micro_batch": base.micro if name == "trl-style" else ""}
            if key == "time_total":
                row.update(generated_tokens=med[name]["generated_tokens"],
                           peak_extra_mem_MiB=round(peaks[name] / 2**20, 1),
                           mem_ratio=round(peaks[name] / max(1, peaks["trl-style"]), 3))
            rows.append(row)
    check = PPOTrainer(dataclasses.replace(cfg, old_logp="check"), ours.policy, ours.value, ours.ref, ours.rm,
                       TOKENIZER)
    _, m = check.collect(batches[0], iters + 2)  # the reused log-probs vs a recompute by the training forward
    rows.append({"case": "old_logp_reuse", "phase": "max |rollout - recomputed|", "time_s": "",
                 "max_abs_diff": m["old_logp_max_diff"], "vocab": vocab, "hidden": hidden, "layers": layers,
                 "dtype": dtype, "device": dev_name, "iterations": 1})
    share = prompt_sharing(ours.policy, vocab, new_tokens)
    rows.append({"case": "prompt_sharing", "phase": "fwd+bwd n=8", "time_s": round(share["time_shared_s"], 3),
                 "speedup": round(1 / share["time_ratio"], 2), "vocab": vocab, "hidden": hidden, "layers": layers,
                 "dtype": dtype, "device": dev_name, "iterations": 1,
                 "tokens_ratio": round(share["tokens_ratio"], 3), "time_ratio": round(share["time_ratio"], 3)})
    return rows


def exact_cpu_peaks() -> None:
    """glibc: serve every allocation over 128 KiB by mmap and trim freed heap, so that the process's resident set
    follows live memory and the peak-RSS reading of one side is not hidden by pages the other side freed."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=1, help="measured iterations per side (after a small warm-up)")
    ap.add_argument("--micro", type=int, default=0, help="trl-style micro-batch (gradient accumulation; 0: none)")
    ap.add_argument("--quick", action="store_true", help="vocab 4096, hidden 128, 2 layers, 1 measured iteration")
    ap.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 (flash-attn varlen when installed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default); 1 is robust "
                    "on a shared machine, where OpenMP barriers of many threads wait on descheduled ones")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    kw = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, prompt_len=args.prompt_len, iters=args.iters,
              micro_batch=args.micro or None)
    if args.quick:
        kw.update(vocab=4096, hidden=128, layers=2, iters=1)
    rows = bench_iteration(**kw, device="cuda" if args.gpu else "cpu")
    name = (f"ppo_iteration_v{kw['vocab']}" + ("_gpu" if args.gpu else "") + ("_quick" if args.quick else "")
            + (f"_t{torch.get_num_threads()}" if not args.gpu and torch.get_num_threads() != 1 else ""))
    write_results(name, rows, plot_x="phase", plot_y="time_s")


if __name__ == "__main__":
    main()
