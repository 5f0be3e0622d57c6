"""The `rlhf-fast` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from rlhf_fast.env_report import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-fast", description="Kernel-accelerated PPO for RLHF.")
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print what is available and which backend each op uses")
    env.add_argument("--json", action="store_true", help="print as JSON")
    env.set_defaults(func=_cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
