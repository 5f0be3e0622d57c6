"""GRPO step time inside TRL: `trl.GRPOTrainer` against `rlhf_fast.integrations.trl.GRPOTrainer`, same weights.

    flock /tmp/rlhf_bench.lock python -m bench.bench_trl_grpo [--gpu | --dry-run] [--num-iterations 1,2]

Each side runs TRL's own `trainer.train()` (dataset, reward function, accelerate, optimizer, logging) for warm-up +
measured steps from the same initial weights; a step is one optimizer step (one generation batch: `--prompts`
prompts x `--generations` completions x up to `--tokens` new tokens). Sides (the `side` column):
  * trl: `trl.GRPOTrainer`, transformers' `generate` (padded, no paged cache), TRL's loss;
  * rlhf_fast-loss: our GRPOTrainer with `generation_backend="trl"`: TRL's generate, our fused loss;
  * rlhf_fast: our GRPOTrainer: RolloutEngine generation (shared prompt blocks, log-probs reused) + fused loss;
  * trl+vllm-colocate (`--gpu`, where vllm is installed): `trl.GRPOTrainer(use_vllm=True, vllm_mode="colocate")`.
Columns: mean step_s over the measured steps, generate_s (TRL's `_generate`: tokenize, generate, decode) and rest_s (scoring, old/ref
log-probs, loss, backward, optimizer), speedup (trl's step_s / this side's), generated tokens/s, mean completion
length, peak extra memory over the run (CPU: resident set high-water mark; CUDA: allocator peak); step_cpu_s and
generate_cpu_s: the same spans in the process's CPU time (all its threads; on a machine shared with other jobs
this is what the step costs, waits for a core excluded) and speedup_cpu from them; step_s_median: the median of the
side's runs' step_s. Each
`--num-iterations` value (GRPO's mu; default 1 and 2) gives one set of rows: at mu = 2 TRL recomputes the old
policy's log-probs with a forward pass after generating, ours reuses the engine's.

Model: Qwen2, hidden 256, 6 layers, 8/2 heads, MLP 1024, vocab 8192 (~9.9M parameters, fp32), word-level tokenizer,
random 16-token prompts; `--gpu`: the same shapes x4 (hidden 1024, vocab 32000, ~170M, bf16) with 64 x 4 x 128.
Each side runs in a fresh process (its own peak memory and caches), `--repeats` times alternating with the
others; its fastest run is kept (the least disturbed on a shared machine). CPU timings use 1 torch thread (see --threads). TRL comes from the tests' peer cache (tests/_peers.py) unless it is
installed. Rows: bench/results/trl_grpo[_gpu|_gpu_dryrun].{csv,json,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import _reset_cpu_peak, _rss_bytes, device_name, results_dir, write_results

SIZES = {  # model, prompts, generations, new tokens, measured steps
    "cpu": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192), 8, 4, 48, 6),
    "gpu": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000), 64, 4, 128, 4),
    "dry-run": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64), 2, 2, 8, 2),
}
WARMUP = 2
ROOT = Path(__file__).resolve().parent.parent


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
        self.steps, self.gens, self.step_tokens, self.lengths = [], [], [], []
        self.cpu_steps, self.cpu_gens = [], []  # the process's CPU time (all its threads): robust to a loaded machine
        self._t0, self._gen, self._tok = 0.0, 0.0, 0
        self._c0, self._cgen = 0.0, 0.0

    def wrap(self, trainer):
        inner = trainer._generate

        def timed(prompts):
            t0, c0 = time.perf_counter(), time.process_time()
            out = inner(prompts)
            self._gen += time.perf_counter() - t0
            self._cgen += time.process_time() - c0
            self._tok += sum(len(c) for c in out[1])
            self.lengths.extend(len(c) for c in out[1])
            return out
        trainer._generate = timed  # this instance only, for the clock

    def on_step_begin(self, args, state, control, **kw):
        self._t0, self._gen, self._tok = time.perf_counter(), 0.0, 0
        self._c0, self._cgen = time.process_time(), 0.0

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self._t0)
        self.gens.append(self._gen)
        self.cpu_steps.append(time.process_time() - self._c0)
        self.cpu_gens.append(self._cgen)
        self.step_tokens.append(self._tok)

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
    # means over the measured steps (an even count: at mu = 2 every other step generates)
    step, gen = statistics.fmean(clock.steps[WARMUP:]), statistics.fmean(clock.gens[WARMUP:])
    cpu, cpu_gen = statistics.fmean(clock.cpu_steps[WARMUP:]), statistics.fmean(clock.cpu_gens[WARMUP:])
    return {"step_s": round(step, 4), "generate_s": round(gen, 4), "rest_s": round(step - gen, 4),
            "step_cpu_s": round(cpu, 4), "generate_cpu_s": round(cpu_gen, 4),
            "gen_tokens_per_s": round(sum(clock.step_tokens[WARMUP:]) / sum(clock.gens[WARMUP:]), 1),
            "mean_completion_len": round(statistics.fmean(clock.lengths), 2),
            "peak_extra_mem_MiB": round(max(peak, 0) / 2**20, 1),
            "engine": bool(getattr(trainer, "use_rlhf_fast_engine", False))}


def plot_bars(name: str, rows: list[dict]) -> Path:
    """Stacked bars per (num_iterations, side): generate_s under rest_s, the speed-up on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['side']}\nmu={r['num_iterations']}" for r in rows]
    xs = range(len(rows))
    ax.bar(xs, [r["generate_s"] for r in rows], label="generate (TRL's _generate)")
    ax.bar(xs, [r["rest_s"] for r in rows], bottom=[r["generate_s"] for r in rows],
           label="rest: rewards, old/ref log-probs, loss, backward, optimizer")
    for x, r in zip(xs, rows):
        ax.text(x, r["step_s"], f"{r['step_s']:.2f} s\n{r['speedup']}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("seconds per GRPO step (mean)")
    r0 = rows[0]
    ax.set_title(f"{name}: {r0['params_M']}M Qwen2, {r0['prompts']} prompts x {r0['generations']} x "
                 f"{r0['new_tokens']} tokens\n{r0.get('device', '')}", fontsize=9)
    ax.set_ylim(0, max(r["step_s"] for r in rows) * 1.2)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sides(trl, plugin, gpu: bool) -> dict:
    """side -> (trainer class, trainer kwargs, GRPOConfig overrides)."""
    out = {"trl": (trl.GRPOTrainer, {}, {}),
           "rlhf_fast-loss": (plugin.GRPOTrainer, {"generation_backend": "trl"}, {}),
           "rlhf_fast": (plugin.GRPOTrainer, {"generation_backend": "rlhf_fast"}, {})}
    if gpu:
        try:
            import vllm  # noqa: F401
            out["trl+vllm-colocate"] = (trl.GRPOTrainer, {}, dict(use_vllm=True, vllm_mode="colocate"))
        except ImportError:
            print("vllm is not installed: no trl+vllm-colocate row")
    return out


def one_side(args, size: str, side: str, mu: int, init: Path) -> dict:
    """Run one side in this process (a fresh one per side: peak memory and caches are its own)."""
    trl, plugin = _import_trl()
    import datasets
    from datasets.table import InMemoryTable
    from transformers import PreTrainedTokenizerFast

    model_cfg, n_prompts, n_gen, new, steps = SIZES[size]
    steps = args.steps or steps
    dev = torch.device("cuda" if args.gpu else "cpu")
    tok = PreTrainedTokenizerFast.from_pretrained(init / "tok")
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(3, model_cfg['vocab_size'])}" for _ in range(16))
               for _ in range(n_prompts * (WARMUP + steps))]
    ds = datasets.Dataset(InMemoryTable.from_pydict({"prompt": prompts}), fingerprint=f"bench-trl-{size}")
    cfg = dict(output_dir=str(init / "out"), per_device_train_batch_size=n_prompts * n_gen, num_generations=n_gen,
               max_completion_length=new, num_iterations=mu, use_cpu=dev.type == "cpu", bf16=args.gpu,
               report_to="none", logging_steps=1000, save_strategy="no", seed=0, learning_rate=1e-5,
               disable_tqdm=True)
    cls, extra, cfg_extra = sides(trl, plugin, args.gpu)[side]
    with contextlib.redirect_stderr(sys.stdout):
        res = run_side(trl, cls, str(init / "model"), tok, ds, {**cfg, **cfg_extra}, extra, steps, dev)
    return {"side": side, "prompts": n_prompts, "generations": n_gen, "new_tokens": new, "num_iterations": mu,
            "steps": steps, **res, "device": device_name(dev)}


def _child(flags: list[str], side: str, mu: int, init: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_trl_grpo", *flags, "--one", side, str(mu), str(init)],
                          cwd=ROOT, capture_output=True, text=True)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode or not found:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise RuntimeError(f"side {side} (mu={mu}) failed with exit {proc.returncode}")
    return json.loads(found[-1][4:])


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, a ~170M Qwen2, 64 x 4 x 128")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (gpu_check's dry run)")
    ap.add_argument("--num-iterations", default="1,2",
                    help="GRPO's mu values, comma-separated (mu > 1: TRL recomputes the old log-probs, we reuse ours)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per side (0: the size's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the fastest is kept")
    ap.add_argument("--one", nargs=3, metavar=("SIDE", "MU", "INIT"), help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    size = "gpu" if args.gpu else "dry-run" if args.dry_run else "cpu"
    if args.one:
        print("ROW " + json.dumps(one_side(args, size, args.one[0], int(args.one[1]), Path(args.one[2]))))
        return 0
    try:
        trl, plugin = _import_trl()
    except Exception as e:  # noqa: BLE001 - no TRL and no way to install it (offline): nothing to compare
        print(f"TRL unavailable: {type(e).__name__}: {e}")
        return 0
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model_cfg = SIZES[size][0]
    flags = [f for f, on in (("--gpu", args.gpu), ("--dry-run", args.dry_run)) if on]
    flags += ["--steps", str(args.steps), "--threads", str(args.threads)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp)
        word_tokenizer(model_cfg["vocab_size"], init / "tok")
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**model_cfg, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                             max_position_embeddings=1024))
        n_params = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        model.save_pretrained(init / "model")
        for mu in (int(m) for m in args.num_iterations.split(",")):
            first = len(rows)
            best: dict[str, dict] = {}
            runs: dict[str, list[float]] = {}
            for rep in range(args.repeats):  # the sides alternate; each keeps its fastest run (least disturbed)
                for side in sides(trl, plugin, args.gpu):
                    row = _child(flags, side, mu, init)
                    runs.setdefault(side, []).append(row["step_s"])
                    print(f"{side} mu={mu} run {rep + 1}: {row['step_s']} s/step (CPU {row['step_cpu_s']} s)",
                          flush=True)
                    if side not in best or row["step_s"] < best[side]["step_s"]:
                        best[side] = row
            for side, row in best.items():
                rows.append({"side": row.pop("side"), "params_M": n_params, **row, "repeats": args.repeats,
                             "step_s_median": round(statistics.median(runs[side]), 4)})
            for r in rows[first:]:
                r["speedup"] = round(rows[first]["step_s"] / r["step_s"], 2)
                r["speedup_cpu"] = round(rows[first]["step_cpu_s"] / r["step_cpu_s"], 2)
    name = "trl_grpo" + {"gpu": "_gpu", "dry-run": "_gpu_dryrun"}.get(size, "")
    write_results(name, rows)
    plot_bars(name, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
