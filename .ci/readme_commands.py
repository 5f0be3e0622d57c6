"""Print the shell commands of README.md's "Two commands on a fresh machine" block, one per line.

`.ci/run` runs exactly these in a fresh virtual environment, so the README and CI cannot drift apart;
`tests/test_install.py` reads the same lines. Comment and blank lines of the block are left out.
"""
from __future__ import annotations

import sys
from pathlib import Path

HEADING = "## Two commands on a fresh machine"


def readme_commands(readme: str | Path) -> list[str]:
    lines = Path(readme).read_text(encoding="utf-8").splitlines()
    if HEADING not in lines:
        raise SystemExit(f"{readme}: no {HEADING!r} section")
    rest = lines[lines.index(HEADING) + 1:]
    start = next(i for i, line in enumerate(rest) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(rest)) if rest[i].startswith("```"))
    cmds = [line.strip() for line in rest[start + 1:end] if line.strip() and not line.lstrip().startswith("#")]
    if not cmds:
        raise SystemExit(f"{readme}: the {HEADING!r} block has no commands")
    return cmds


if __name__ == "__main__":
    print("\n".join(readme_commands(sys.argv[1] if len(sys.argv) > 1 else "README.md")))
