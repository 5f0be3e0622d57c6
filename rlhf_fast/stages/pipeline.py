"""SFT -> reward model -> PPO, then the report: the labeler's win rate of PPO over SFT on held-out prompts.

Without data paths it runs the embedded default (`rlhf_fast.default_task`): a word-level tokenizer and a small
Llama built from scratch, demonstrations and rankings from the programmatic labeler. With `sft.train_data`,
`rm.*_data` and `ppo.prompts` given it runs on those; the win rate is then judged by the reward model instead
(there is no labeler), and says so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from rlhf_fast import distributed, preflight
from rlhf_fast.chat import Codec
from rlhf_fast.config import ConfigError, PipelineConfig, to_dict
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import load_model
from rlhf_fast.models.loading import check_family, load_tokenizer
from rlhf_fast.rollout import SamplingParams
from rlhf_fast.stages import packed_passes as pp
from rlhf_fast.stages.common import MetricsLog, jsonable, plot_panels, resolve_device
from rlhf_fast.stages.experience import make_rollout
from rlhf_fast.stages.ppo import train_ppo
from rlhf_fast.stages.rm import train_rm
from rlhf_fast.stages.run_state import EXTEND_KEYS, check_config, exclusive, read_truncation
from rlhf_fast.stages.sft import train_sft

log = logging.getLogger(__name__)


def _with_default_task(cfg: PipelineConfig, out: Path, *, write: bool) -> tuple[PipelineConfig, str, bool]:
    """Fill in the default task's tokenizer and data when `sft.train_data` is empty (written only if `write`:
    a rerun finds them in place, written from the same `task` config). Returns (config, held-out prompts file, whether the labeler judges)."""
    if cfg.sft.train_data:
        missing = [k for k, v in (("rm.train_data", cfg.rm.train_data), ("ppo.prompts", cfg.ppo.prompts),
                                  ("eval_prompts", cfg.eval_prompts)) if not v]
        if missing:
            raise ConfigError(f"with sft.train_data given, also set {', '.join(missing)}")
        return cfg, cfg.eval_prompts, False
    from rlhf_fast.default_task import TASK_FILES, build_tokenizer, write_task_data

    paths = {name: str(out / "data" / f"{name}.jsonl") for name in TASK_FILES}
    if write or not all(Path(p).is_file() for p in paths.values()) or not (out / "tokenizer").is_dir():
        paths = None
        if distributed.is_main():  # one writer; the other ranks read what it wrote
            build_tokenizer(out / "tokenizer")
            paths = write_task_data(out / "data", cfg.task)
        paths = distributed.all_gather_objects(paths)[0]
    sft = dataclasses.replace(cfg.sft, tokenizer=str(out / "tokenizer"), train_data=paths["sft_train"],
                              eval_data=paths["sft_eval"])
    rm = dataclasses.replace(cfg.rm, train_data=paths["rm_train"], eval_data=paths["rm_eval"])
    ppo = dataclasses.replace(cfg.ppo, prompts=paths["ppo_prompts"],
                              ptx_data=paths["ptx"] if cfg.ppo.ptx_coef > 0 else cfg.ppo.ptx_data)
    return dataclasses.replace(cfg, sft=sft, rm=rm, ppo=ppo), paths["ppo_eval"], True


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, temperature: float, max_new_tokens: int, seed: int,
           stop_ids: tuple[int, ...], n: int = 1):
    """`n` completions per prompt from `model` with the rollout engine (the n share the prompt's prefill), in
    prompt order."""
    from rlhf_fast.rollout import RolloutEngine

    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=stop_ids, n=n)
    return sorted(RolloutEngine(model).generate(prompts, params), key=lambda c: c.prompt_index)


@torch.no_grad()
def compare_policies(sft_dir: Path, ppo_dir: Path, rm_dir: Path, prompts_file: str, *, temperature: float,
                     max_new_tokens: int, use_labeler: bool, seed: int = 0, device: str = "auto",
                     max_len: int = 10**9, overlong: str = "truncate", samples: int = 1) -> dict:
    """Sample each policy `samples` times per held-out prompt; the labeler's (or the RM's) win rate of PPO over
    SFT (each PPO sample against one SFT sample of its prompt; ties count half), mean RM rewards, and the PPO
    samples' mean KL to SFT (sum over tokens of log-ratio). More samples per prompt narrow the estimate (200
    prompts, one sample: a binomial standard error of ~3 points at 70%). The prompts fit as PPO's do (`max_len`,
    `overlong`: `rlhf_fast.preflight.load_rollout_prompts`)."""
    tokenizer = load_tokenizer(sft_dir, "sft model")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = resolve_device(device)
    sft = load_model(sft_dir, "sft model", device=dev).eval().requires_grad_(False)
    ppo = load_model(ppo_dir, "ppo policy", device=dev).eval().requires_grad_(False)
    rm = ScalarHeadModel.from_pretrained(rm_dir, what="reward model").to(dev).eval().requires_grad_(False)
    held = preflight.load_rollout_prompts(prompts_file, tokenizer, sft, max_len=max_len,
                                          max_new_tokens=max_new_tokens, overlong=overlong)
    ids = [p.ids for p in held]
    held = [p for p in held for _ in range(samples)]  # each prompt once per completion, as `sample` returns them
    kw = dict(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, stop_ids=Codec(tokenizer).stop_ids,
              n=samples)
    out = {}
    for name, model in (("sft", sft), ("ppo", ppo)):
        comps = sample(model, ids, **kw)
        ro = make_rollout(ids, comps, pad_id, dev)
        out[name] = {"texts": [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps],
                     "scores": pp.scores(rm, ro).cpu()}
        if name == "ppo":
            lp_t = temperature if temperature > 0 else 1.0  # greedy: log-probs at temperature 1
            kl = (pp.policy_logprobs(ppo, ro, lp_t) - pp.policy_logprobs(sft, ro, lp_t)) * ro.mask
            out["mean_kl"] = float(kl.sum(1).mean())
    report = {"mean_reward_sft": float(out["sft"]["scores"].mean()),
              "mean_reward_ppo": float(out["ppo"]["scores"].mean()), "mean_kl": out["mean_kl"],
              "eval_prompts": len(held) // samples, "eval_samples": samples}
    if use_labeler:
        from rlhf_fast.default_task import labeler

        wins = [labeler.compare(p.text, a, b) for p, a, b in zip(held, out["ppo"]["texts"], out["sft"]["texts"])]
        report["win_rate_judge"] = "labeler"
        for name in ("sft", "ppo"):
            js = [labeler.judge(p.text, t) for p, t in zip(held, out[name]["texts"])]
            report[f"correct_{name}"] = sum(j.correct for j in js) / len(js)
            report[f"mean_words_{name}"] = sum(j.n_words for j in js) / len(js)
    else:
        diff = out["ppo"]["scores"] - out["sft"]["scores"]
        wins = ((diff > 0).float() + 0.5 * (diff == 0).float()).tolist()
        report["win_rate_judge"] = "reward_model"
    report["win_rate"] = sum(wins) / len(wins)
    report["examples"] = [{"prompt": p.text, "sft": a, "ppo": b}
                          for p, a, b in list(zip(held, out["sft"]["texts"], out["ppo"]["texts"]))[:8 * samples:samples]]
    return report


@exclusive
def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, *, stop_after: tuple[str, int] | None = None) -> dict:
    """All three stages into `out_dir/{sft,rm,ppo}`, then `out_dir/report.json`. Rerunning resumes; the report's
    times are each stage's training time summed over resumed runs, plus this run's setup and evaluation. The run
    records its config in `out_dir/config.json` (a rerun may change only `ALLOWED_CHANGES`); a finished run is not
    rewritten. `stop_after=(stage, n)`: stop (checkpointed) after n steps of that stage; returns {"stopped": ...}
    then."""
    start = time.perf_counter()
    out = Path(out_dir)
    started = any(out.glob("*/checkpoint*"))  # a stage has trained: the recorded config holds
    changes = check_config(out, to_dict(cfg), name="pipeline", started=started)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, eval_prompts, use_labeler = _with_default_task(cfg, out, write=not started)
    mnt = cfg.ppo.sampling.max_new_tokens
    if cfg.sft.model:  # before SFT: one line for a model family rlhf_fast's models do not cover
        check_family(cfg.sft.model, "sft.model")
    preflight.pipeline_prompts(cfg.sft.model, cfg.sft.tokenizer, cfg.sft.arch.max_position_embeddings,
                               [cfg.ppo.prompts, eval_prompts], max_len=cfg.ppo.max_len, max_new_tokens=mnt,
                               overlong=cfg.ppo.overlong)  # before SFT: every prompt PPO and the report read
    setup_s = time.perf_counter() - start

    def stop(stage: str) -> dict:
        return {"stop_after": stop_after[1]} if stop_after and stop_after[0] == stage else {}

    def stopped(stage: str, result) -> dict | None:
        if result[0] != out / stage / "checkpoint":
            return None
        log.info("pipeline: stopped after %d %s steps; rerun the same command to resume", result.steps, stage)
        return {"stopped": stage, "steps": result.steps, "checkpoint": str(result[0])}

    sft = train_sft(cfg.sft, out / "sft", plots=False, **stop("sft"))
    if (halt := stopped("sft", sft)) is not None:
        return halt
    log.info("sft: eval loss %.4f after %d steps", sft.eval_loss, sft.steps)
    rm = train_rm(dataclasses.replace(cfg.rm, model=str(sft.model_dir)), out / "rm", plots=False, **stop("rm"))
    if (halt := stopped("rm", rm)) is not None:
        return halt
    log.info("rm: held-out pairwise accuracy %.3f", rm.accuracy)
    ppo = train_ppo(dataclasses.replace(cfg.ppo, policy=str(sft.model_dir), reward_model=str(rm.model_dir)),
                    out / "ppo", plots=False, **stop("ppo"))
    if (halt := stopped("ppo", ppo)) is not None:
        return halt
    if (out / "report.json").is_file() and not any(k.rsplit(".", 1)[-1] in EXTEND_KEYS for k in changes):
        log.warning("pipeline: %s is complete; its report.json is kept as it is", out)
        return json.loads((out / "report.json").read_text())
    scale = {"world_size": distributed.world_size(),
             "peak_rss_mib": distributed.all_gather_objects(_peak_rss_mib())}
    if not distributed.is_main():  # rank 0 alone evaluates and reports
        return {}
    t = time.perf_counter()
    cmp = compare_policies(sft.model_dir, ppo.policy_dir, rm.model_dir, eval_prompts,
                           temperature=cfg.eval_temperature, max_new_tokens=cfg.ppo.sampling.max_new_tokens,
                           use_labeler=use_labeler, seed=cfg.ppo.seed + 1, device=cfg.ppo.device,
                           max_len=cfg.ppo.max_len, overlong=cfg.ppo.overlong, samples=cfg.eval_samples)
    times = {"setup": setup_s, "sft": sft.elapsed_s, "rm": rm.elapsed_s, "ppo": ppo.elapsed_s,
             "eval": time.perf_counter() - t}
    report = {"sft_eval_loss": _or_null(sft.eval_loss), "rm_accuracy": _or_null(rm.accuracy), **cmp,
              "skipped_steps": {"sft": sft.skipped_steps, "rm": rm.skipped_steps, "ppo": ppo.skipped_steps},
              "truncation": {stage: read_truncation(out / stage) for stage in ("sft", "rm", "ppo")},
              "stage_time_s": times, "wall_time_s": sum(times.values()), "torch_threads": torch.get_num_threads(),
              "distributed": scale}
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2))
    plot_curves(out)
    return report


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _or_null(x: float) -> float | None:
    """NaN (nothing to evaluate) becomes null, so report.json stays strict JSON."""
    return None if x != x else x


def plot_curves(out: Path) -> Path:
    """All three stages' curves in one figure, `out/curves.png`."""
    sft, rm, ppo = (MetricsLog(out / s, "metrics", resume_step=10**12).rows() for s in ("sft", "rm", "ppo"))
    panels = [("sft loss", sft, "loss"), ("sft eval loss", sft, "eval_loss"), ("rm loss", rm, "loss"),
              ("rm held-out accuracy", rm, "eval_accuracy"), ("ppo reward (RM score)", ppo, "score"),
              ("ppo KL to SFT", ppo, "kl"), ("ppo response length", ppo, "response_len"),
              ("ppo kl_coef", ppo, "kl_coef")]
    return plot_panels(panels, out / "curves.png", "SFT -> RM -> PPO")
