"""The `rlhf-fast` command line."""
from __future__ import annotations

import argparse
import errno
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from rlhf_fast.env_report import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


_STAGES = {
    # command: (config class name, runner "module:function", help)
    "sft": ("SFTConfig", "rlhf_fast.stages.sft:train_sft", "supervised fine-tuning on demonstrations"),
    "rm": ("RMConfig", "rlhf_fast.stages.rm:train_rm", "reward model on K-way rankings or chosen/rejected pairs"),
    "ppo": ("PPOConfig", "rlhf_fast.stages.ppo:train_ppo", "PPO against the reward model (KL to the SFT policy)"),
    "pipeline": ("PipelineConfig", "rlhf_fast.stages.pipeline:run_pipeline",
                 "SFT -> RM -> PPO -> report; with no arguments, the embedded default task"),
}


def _error_line(e: BaseException) -> str | None:
    """The one line the CLI prints for a fault of the user's input or machine; None: a bug (a traceback)."""
    from rlhf_fast.checkpoint import CheckpointError
    from rlhf_fast.config import ConfigError
    from rlhf_fast.data import DataError
    from rlhf_fast.distributed import DistributedError
    from rlhf_fast.models.loading import ModelLoadError
    from rlhf_fast.stages.common import DivergedError
    from rlhf_fast.stages.reward_fn import RewardFnError
    from rlhf_fast.stages.run_state import RunDirError

    kinds = [(ConfigError, "config error"), (DataError, "data error"), (CheckpointError, "checkpoint error"),
             (ModelLoadError, "model error"), (RunDirError, "run directory error"), (DivergedError, "diverged"),
             (DistributedError, "distributed error"), (RewardFnError, "reward_fn error")]
    for cls, kind in kinds:
        if isinstance(e, cls):
            return f"{kind}: {e}"
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}".lower() if e.errno == errno.ENOSPC else f"{e.strerror or e}{where}"
    return None


def _cmd_stage(args: argparse.Namespace) -> int:
    import importlib
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only: no hub retries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_fast import config, distributed
    from rlhf_fast.stages.common import jsonable

    cls_name, runner, _ = _STAGES[args.command]
    try:
        cfg = config.load_config(getattr(config, cls_name), args.config, args.set)
        stop_after = _parse_stop_after(args.command, args.stop_after)
        distributed.init()  # under torchrun: join the job (a plain command is world size 1)
        main_rank = distributed.is_main()  # rank 0 alone prints and logs
        logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        module, fn = runner.split(":")
        out = args.out or os.path.join("runs", args.command)
        kw = {} if stop_after is None else {"stop_after": stop_after}
        result = getattr(importlib.import_module(module), fn)(cfg, out, **kw)
    except KeyboardInterrupt:  # Ctrl-C: where a rerun resumes, exit code 130 (128 + SIGINT) as a shell reports it
        if args.debug:
            raise
        from rlhf_fast.stages.run_state import interrupted_line

        print(f"\nrlhf-fast {args.command}: {interrupted_line()}", file=sys.stderr)
        return 130
    except Exception as e:
        line = _error_line(e)
        if line is None or args.debug:
            raise
        print(f"rlhf-fast {args.command}: {line}", file=sys.stderr)
        return 2
    if not main_rank:
        return 0
    if isinstance(result, dict):
        print(json.dumps(jsonable({k: v for k, v in result.items() if k != "examples"}), indent=2))
    else:
        print(json.dumps(jsonable({k: str(v) if not isinstance(v, (int, float)) else v
                                   for k, v in result._asdict().items()}), indent=2))
    print(f"outputs in {out}", file=sys.stderr)
    return 0


def _parse_stop_after(command: str, value: str | None):
    """`--stop-after N` (optimiser steps for sft/rm, iterations for ppo) or, for pipeline, `STAGE:N`."""
    from rlhf_fast.config import ConfigError

    if value is None:
        return None
    stage, _, n = value.rpartition(":")
    if command == "pipeline":
        if stage not in ("sft", "rm", "ppo"):
            raise ConfigError(f"--stop-after: expected STAGE:N with STAGE sft, rm or ppo, got {value!r}")
    elif stage:
        raise ConfigError(f"--stop-after: expected a number of {'iterations' if command == 'ppo' else 'steps'}, "
                          f"got {value!r}")
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"--stop-after: N must be an integer >= 1, got {value!r}")
    return (stage, int(n)) if command == "pipeline" else int(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-fast", description="Kernel-accelerated PPO for RLHF.")
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print what is available and which backend each op uses")
    env.add_argument("--json", action="store_true", help="print as JSON")
    env.set_defaults(func=_cmd_env)
    for name, (_, _, help_text) in _STAGES.items():
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--config", metavar="FILE", help="YAML config (keys as in the stage's dataclass)")
        sp.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, dotted for nested keys (e.g. --set optim.lr=3e-4); repeatable")
        sp.add_argument("--out", metavar="DIR", help=f"run directory (default runs/{name}); rerunning resumes")
        sp.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        unit = "STAGE:N" if name == "pipeline" else "N"
        sp.add_argument("--stop-after", metavar=unit, help="stop with a checkpoint after N optimiser steps (sft, rm) "
                        "or iterations (ppo)" + (" of STAGE" if name == "pipeline" else "") +
                        "; rerunning the command (at any world size) resumes")
        sp.set_defaults(func=_cmd_stage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
