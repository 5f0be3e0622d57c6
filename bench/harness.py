"""Shared benchmark harness: median time with warm-up, peak extra memory, max |error| vs float64, roofline units.

Every benchmark builds `Case`s, calls `run_case` on each and `write_results` once; results land in
`bench/results/<name>.{csv,json,png}` (or under $RLHF_FAST_BENCH_RESULTS) and name the device they ran on. On a
GPU listed in `bench/roofline.py`, rows with GB/s or TFLOP/s also get their fraction of the device's peak.

Peak memory: on CUDA, the caching allocator's peak above the baseline; on CPU, the process's peak resident set
above its size right before the call (Linux `/proc/self/clear_refs` resets the high-water mark), so it counts every
allocation the call makes, torch's or not.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import roofline

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "RLHF_FAST_BENCH_RESULTS"  # overrides RESULTS_DIR (bench/gpu_check.py points it at its --out)


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


@dataclasses.dataclass
class Case:
    """One measured configuration. `fn()` runs the thing timed; `ref()` (optional) gives the float64 answer and
    `out_of(result)` picks the tensors to compare from what `fn` returned."""

    name: str  # e.g. "fused/fwd+bwd"
    params: dict
    fn: Callable[[], object]
    ref: Callable[[], object] | None = None
    out_of: Callable[[object], object] = lambda r: r
    bytes_moved: float | None = None  # for GB/s
    flops: float | None = None  # for TFLOP/s


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes allocated at peak by one call of `fn`, above what was live before it."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if not _reset_cpu_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
    base = _rss_bytes("VmRSS")
    out = fn()
    peak = _rss_bytes("VmHWM") - base
    del out
    return max(int(peak), 0)


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2,
            repeats: int = 5, min_time_s: float = 0.0) -> tuple[float, list[float]]:
    """Median wall time in ms over `repeats` calls after `warmup` calls (CUDA events on GPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def owned_model(hf, *, lm_head: bool = True):
    """rlhf_fast's own model (a `DecoderLM`: `models.build_model(hf.config)`, built on meta) holding a copy of
    transformers model `hf`'s weights, loaded under our names through `state_dict_adapter.from_hf_name`
    (`lm_head=False`: the bare backbone of a value / reward model), on `hf`'s device and in its dtype. Not
    `models.as_decoder(hf)`: that shares the HF model's modules, while the stages train what `models.load_model`
    builds, plain owned modules with no transformers object behind them; this is that model, so a bench can build
    the HF baseline and rlhf_fast's side from one seed."""
    from rlhf_fast.models import build_model
    from rlhf_fast.models.state_dict_adapter import from_hf_name

    model = build_model(hf.config, lm_head=lm_head, device="meta")
    state = {}
    for name, tensor in hf.state_dict().items():
        ours = from_hf_name(name, hf.config)
        if ours is not None and (lm_head or not ours.startswith("lm_head.")):
            state[ours] = tensor.detach().clone()
    model.load_state_dict(state, strict=True, assign=True)
    if lm_head and getattr(hf.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed.weight  # one Parameter, as HF ties them
    return model.eval()


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flatten(item)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flatten(v)]
    return []


def max_abs_error(out, ref) -> float:
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        raise ValueError(f"result has {len(outs)} tensors but the reference has {len(refs)}")
    err = 0.0
    for o, r in zip(outs, refs):
        if o.numel():
            err = max(err, float((o.detach().double().cpu() - r.detach().double().cpu()).abs().max()))
    return err


def run_case(case: Case, device: torch.device | str = "cpu", *, warmup: int = 2, repeats: int = 5,
             measure_memory: bool = True) -> dict:
    device = torch.device(device)
    row = {"case": case.name, **case.params}
    result = case.out_of(case.fn())
    if case.ref is not None:
        row["max_abs_err_vs_fp64"] = max_abs_error(result, case.ref())
    del result
    if measure_memory:
        row["peak_extra_mem_MiB"] = round(peak_extra_memory(case.fn, device) / 2**20, 2)
    ms, _ = time_fn(case.fn, device, warmup=warmup, repeats=repeats)
    row["time_ms"] = round(ms, 4)
    if case.bytes_moved:
        row["GB_per_s"] = round(case.bytes_moved / (ms * 1e-3) / 1e9, 2)
    if case.flops:
        row["TFLOP_per_s"] = round(case.flops / (ms * 1e-3) / 1e12, 4)
    row["device"] = device_name(device)
    memcpy = roofline.memcpy_gbs(str(device)) if device.type == "cuda" and case.bytes_moved else None
    row.update(roofline.fractions(row["device"], row.get("GB_per_s"), row.get("TFLOP_per_s"),
                                  case.params.get("dtype"), memcpy))
    if memcpy:
        row["memcpy_GB_per_s"] = memcpy
    return row


def write_results(name: str, rows: list[dict], *, plot_x: str | None = None, plot_y: str = "time_ms",
                  group_by: str = "case", logy: bool = False) -> Path:
    """Write `bench/results/<name>.csv`, `.json` and (if `plot_x`) a `.png` of `plot_y` against `plot_x`, and print
    the rows."""
    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    csv_path = out_dir / f"{name}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    meta = {"benchmark": name, "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2))
    if plot_x is not None:
        plot(name, rows, plot_x, plot_y, group_by=group_by, logy=logy)
    for r in rows:  # the same rows on stdout, without empty cells and the (shared) device column
        print({k: v for k, v in r.items() if k != "device" and v not in ("", None)})
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    print(f"device: {'; '.join(devices) or 'unknown'}\nwrote {csv_path} (+ .json{', .png' if plot_x else ''})")
    return csv_path


def plot(name: str, rows: list[dict], x: str, y: str, *, group_by: str = "case", logy: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group_by)), []).append(r)
    xs_all = sorted({r[x] for r in rows if x in r}, key=lambda v: (isinstance(v, str), v))
    categorical = any(isinstance(v, str) for v in xs_all)
    for label, rs in groups.items():
        rs = [r for r in rs if x in r and y in r]
        if categorical:
            xs = [xs_all.index(r[x]) for r in rs]
        else:
            rs = sorted(rs, key=lambda r: r[x])
            xs = [r[x] for r in rs]
        ax.plot(xs, [r[y] for r in rs], marker="o", label=label)
    if categorical:
        ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all], rotation=20)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    dev = rows[0].get("device", "") if rows else ""
    ax.set_title(f"{name}\n{dev}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
