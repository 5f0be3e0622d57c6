"""README command 1 installs everything the package and the tests import (command 2 then runs on a fresh machine).

`.ci/run` runs the same commands in a fresh virtual environment; this test catches a missing dependency here in
seconds: each third-party module imported at the top of a file in `rlhf_fast/` or `tests/` must come from a
distribution that command 1 installs (named in it, or a dependency or selected extra in pyproject.toml).
"""
import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.readme_commands(ROOT / "README.md")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(requirement: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def installed_by(command: str) -> set[str]:
    """Distributions a `pip install ...` command line installs directly (this project's deps and extras included)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: set[str] = set()
    for part in command.split("&&"):
        words = part.split()
        if words[:2] != ["pip", "install"]:
            continue
        for w in (w.strip("'\"") for w in words[2:] if w != "-e" and not w.startswith("-")):
            m = re.fullmatch(r"\.(?:\[([A-Za-z0-9_,-]+)\])?", w)
            if m is None:
                out.add(_dist_name(w))
                continue
            out.update(_dist_name(r) for r in project["dependencies"])
            for extra in (m.group(1) or "").split(","):
                if extra:
                    out.update(_dist_name(r) for r in project["optional-dependencies"][extra])
    return out


def top_level_imports(path: Path) -> set[str]:
    """Top-level module names imported unconditionally at module level (not in functions or `try`)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_readme_has_the_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2 and cmds[1] == "python3 -m pytest -q"
    assert "pip install" in cmds[0] and "rlhf-fast pipeline" in cmds[0]


def test_command_1_installs_every_import_of_the_package_and_tests():
    have = installed_by(_readme_commands()[0])
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"rlhf_fast", "kernels", "bench", "tests"}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    files = sorted((ROOT / "rlhf_fast").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    for f in files:
        for mod in top_level_imports(f) - local - set(sys.stdlib_module_names):
            if not {_norm(d) for d in dists.get(mod, [mod])} & have:
                missing.setdefault(mod, f.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not installed by README command 1 ({sorted(have)}): {missing}"


def test_installed_by_reads_extras():
    assert {"pytest", "hypothesis", "torch"} <= installed_by('pip install torch==2.13.0 && pip install -e ".[dev]"')
    assert "pytest" not in installed_by("pip install -e . && rlhf-fast pipeline")
