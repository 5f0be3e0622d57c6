"""GRPO step time inside TRL: `trl.GRPOTrainer` against `rlhf_fast.integrations.trl.GRPOTrainer`, same weights.

    flock /tmp/rlhf_bench.lock python -m bench.bench_trl_grpo [--gpu | --dry-run] [--num-iterations 1]

Each side runs TRL's own `trainer.train()` (dataset, reward function, accelerate, optimizer, logging) for warm-up +
measured steps from the same initial weights; a step is one optimizer step (one generation batch: `--prompts`
prompts x `--generations` completions x up to `--tokens` new tokens). Sides (the `side` column):
  * trl: `trl.GRPOTrainer`, transformers' `generate` (padded, no paged cache), TRL's loss;
  * rlhf_fast-loss: our GRPOTrainer with `generation_backend="trl"`: TRL's generate, our fused loss;
  * rlhf_fast: our GRPOTrainer: RolloutEngine generation (shared prompt blocks, log-probs reused) + fused loss;
  * trl+vllm-colocate (`--gpu`, where vllm is installed): `trl.GRPOTrainer(use_vllm=True, vllm_mode="colocate")`.
Columns: median step_s, generate_s (TRL's `_generate`: tokenize, generate, decode) and rest_s (scoring, old/ref
log-probs, loss, backward, optimizer), speedup (trl's step_s / this side's), generated tokens/s, mean completion
length, peak extra memory over the run (CPU: resident set high-water mark; CUDA: allocator peak).

Model: Qwen2, hidden 256, 6 layers, 8/2 heads, MLP 1024, vocab 8192 (~9.9M parameters, fp32), word-level tokenizer,
random 16-token prompts; `--gpu`: the same shapes x4 (hidden 1024, vocab 32000, ~170M, bf16) with 64 x 4 x 128.
CPU timings use 1 torch thread (see --threads). TRL comes from the tests' peer cache (tests/_peers.py) unless it is
installed. Rows: bench/results/trl_grpo[_gpu|_gpu_dryrun].{csv,json,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import _reset_cpu_peak, _rss_bytes, device_name, write_results

SIZES = {  # model, prompts, generations, new tokens, measured steps
    "cpu": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192), 8, 4, 48, 6),
    "gpu": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000), 64, 4, 128, 4),
    "dry-run": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64), 2, 2, 8, 1),
}
WARMUP = 2


def _import_trl():
    """(trl, our plug-in module): the installed TRL, else the tests' cached peer install."""
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import _peers

        _peers.install("trl")
    import trl

    from rlhf_fast.integrations import trl as plugin
    return trl, plugin


def word_tokenizer(vocab: int, out_dir: Path):
    """A word-level tokenizer of `vocab` ids: <pad> 0, <eos> 1, <unk> 2, then w3 ... (decodes with spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


class StepClock:
    """A TrainerCallback (duck-typed) timing each optimizer step, and a wrapper timing `_generate` in it."""

    def __init__(self):
        self.steps, self.gens, self.tokens, self._t0, self._gen = [], [], [], 0.0, 0.0

    def wrap(self, trainer):
        inner = trainer._generate

        def timed(prompts):
            t0 = time.perf_counter()
            out = inner(prompts)
            self._gen += time.perf_counter() - t0
            self.tokens.append(sum(len(c) for c in out[1]))
            return out
        trainer._generate = timed  # this instance only, for the clock

    def on_step_begin(self, args, state, control, **kw):
        self._t0, self._gen = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self._t0)
        self.gens.append(self._gen)

    def __getattr__(self, name):  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def run_side(trl, cls, init: str, tok, ds, cfg: dict, extra: dict, steps: int, dev: torch.device) -> dict:
    args = trl.GRPOConfig(**cfg, max_steps=WARMUP + steps)
    trainer = cls(model=init, args=args, train_dataset=ds, processing_class=tok,
                  reward_funcs=lambda completions, **kw: [len(c) / 100.0 for c in completions], **extra)
    clock = StepClock()
    clock.wrap(trainer)
    trainer.add_callback(clock)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_cpu_peak()
        base = _rss_bytes("VmRSS")
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_bytes("VmHWM")) - base
    step, gen = statistics.median(clock.steps[WARMUP:]), statistics.median(clock.gens[WARMUP:])
    tokens = statistics.median(clock.tokens[WARMUP:])
    return {"step_s": round(step, 4), "generate_s": round(gen, 4), "rest_s": round(step - gen, 4),
            "gen_tokens_per_s": round(tokens / gen, 1) if gen > 0 else "",
            "mean_completion_len": round(tokens / (cfg["per_device_train_batch_size"]), 2),
            "peak_extra_mem_MiB": round(max(peak, 0) / 2**20, 1),
            "engine": bool(getattr(trainer, "use_rlhf_fast_engine", False))}


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, a ~170M Qwen2, 64 x 4 x 128")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (gpu_check's dry run)")
    ap.add_argument("--num-iterations", type=int, default=1, help="GRPO's mu (> 1: TRL recomputes old log-probs)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per side (0: the size's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    size = "gpu" if args.gpu else "dry-run" if args.dry_run else "cpu"
    model_cfg, n_prompts, n_gen, new, steps = SIZES[size]
    steps = args.steps or steps
    dev = torch.device("cuda" if args.gpu else "cpu")
    try:
        trl, plugin = _import_trl()
    except Exception as e:  # noqa: BLE001 - no TRL and no way to install it (offline): nothing to compare
        print(f"TRL unavailable: {type(e).__name__}: {e}")
        return 0
    import datasets
    from datasets.table import InMemoryTable
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = word_tokenizer(model_cfg["vocab_size"], Path(tmp) / "tok")
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**model_cfg, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                             max_position_embeddings=1024))
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "init")
        rng = random.Random(0)
        prompts = [" ".join(f"w{rng.randrange(3, model_cfg['vocab_size'])}" for _ in range(16))
                   for _ in range(n_prompts * (WARMUP + steps))]
        ds = datasets.Dataset(InMemoryTable.from_pydict({"prompt": prompts}), fingerprint=f"bench-trl-{size}")
        cfg = dict(output_dir=str(Path(tmp) / "out"), per_device_train_batch_size=n_prompts * n_gen,
                   num_generations=n_gen, max_completion_length=new, num_iterations=args.num_iterations,
                   use_cpu=dev.type == "cpu", bf16=args.gpu, report_to="none", logging_steps=1000,
                   save_strategy="no", seed=0, learning_rate=1e-5, disable_tqdm=True)
        sides = [("trl", trl.GRPOTrainer, {}, {}),
                 ("rlhf_fast-loss", plugin.GRPOTrainer, {"generation_backend": "trl"}, {}),
                 ("rlhf_fast", plugin.GRPOTrainer, {"generation_backend": "rlhf_fast"}, {})]
        if args.gpu:
            try:
                import vllm  # noqa: F401
                sides.append(("trl+vllm-colocate", trl.GRPOTrainer, {}, dict(use_vllm=True, vllm_mode="colocate")))
            except ImportError:
                print("vllm is not installed: no trl+vllm-colocate row")
        for name, cls, extra, cfg_extra in sides:
            with contextlib.redirect_stderr(sys.stdout):
                res = run_side(trl, cls, str(Path(tmp) / "init"), tok, ds, {**cfg, **cfg_extra}, extra, steps, dev)
            rows.append({"side": name, "params_M": round(n_params / 1e6, 2), "prompts": n_prompts,
                         "generations": n_gen, "new_tokens": new, "num_iterations": args.num_iterations,
                         "steps": steps, **res})
    base = rows[0]["step_s"]
    for r in rows:
        r["speedup"] = round(base / r["step_s"], 2)
        r["device"] = device_name(dev)
    suffix = {"gpu": "_gpu", "dry-run": "_gpu_dryrun"}.get(size, "")
    name = f"trl_grpo{suffix}" + (f"_mu{args.num_iterations}" if args.num_iterations != 1 else "")
    write_results(name, rows, plot_x="side", plot_y="step_s", group_by="num_iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
