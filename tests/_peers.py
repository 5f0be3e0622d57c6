"""The peers' real packages for the integration tests, installed once per version into a cache folder.

Each peer (verl, TRL, OpenRLHF) is tested at every release its plug-in declares (`SUPPORTED_VERSIONS` in
`rlhf_fast/integrations/<peer>.py`) and at the newest release the package index serves, when that is another one
(`versions()`; `pip index versions`, else `pip download --no-deps`; if the index does not answer, that case is
skipped with the reason). A peer is installed with `pip install --no-deps --target` into its own folder per version,
`$RLHF_FAST_PEERS_DIR` (default `~/.cache/rlhf_fast/peers`) / `<peer>-<version>-<key>`, and the few packages its
imported modules need (the trainers' full dependency sets pull in vLLM, flash-attn and CUDA wheels), all pinned,
into one folder per peer shared by its versions. The first run downloads from PyPI (about 500 MB, a minute or two);
later runs only add the folders to `sys.path`, after the interpreter's own packages so that torch, transformers and
numpy stay the installed ones. Nothing of a peer is stubbed: the tests import and call the peers' own functions.

Environment: `RLHF_FAST_PEERS_NEWEST=0` skips the index lookup (the supported releases only);
`RLHF_FAST_PEERS_EXTRA="trl==1.15.0 verl==0.9.0"` adds releases to test.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.utils import parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from rlhf_fast.integrations import _versions

# What each peer's imported modules need beside the peer itself, pinned (the peer's own version: its plug-in's
# SUPPORTED_VERSIONS, and the newest release on the index).
DEPS = {
    "verl": ("ray==2.60.0", "tensordict==0.10.0", "omegaconf==2.4.0",
             "antlr4-python3-runtime==4.9.3", "msgpack==1.2.4", "protobuf==7.36.2", "pyvers==0.2.3",
             "codetiming==1.4.0",
             # verl imports requests, ray jsonschema, tensordict cloudpickle and orjson: a fresh venv of ours has none
             "requests==2.34.2", "urllib3==2.7.0", "certifi==2026.5.20", "charset-normalizer==3.4.7",
             "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==0.30.0",
             "attrs==26.1.0", "cloudpickle==2.1.0", "orjson==3.8.3"),
    "trl": ("accelerate==1.15.0", "datasets==5.2.0", "pandas==3.1.1", "pyarrow==26.0.1",
            "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0"),
    # deepspeed (imported by openrlhf.models.utils) builds as pure Python with DS_BUILD_OPS=0
    "openrlhf": ("deepspeed==0.19.8", "peft==0.21.2", "accelerate==1.15.0",
                 "hjson==3.1.0", "einops==0.8.2", "psutil==7.2.2", "msgpack==1.2.4"),
}
_PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")
_ASK = ("--timeout", "15", "--retries", "1")  # an index lookup: fail fast when offline
_loaded: dict[str, str] = {}  # peer -> the version whose folder is on sys.path


def supported(name: str) -> tuple[str, ...]:
    """The releases the plug-in declares (rlhf_fast.integrations.<name>.SUPPORTED_VERSIONS)."""
    return importlib.import_module(f"rlhf_fast.integrations.{name}").SUPPORTED_VERSIONS


def _query_index(name: str) -> str:
    """The newest release of `name` the package index serves (pre-releases excluded); raises RuntimeError."""
    try:
        proc = subprocess.run([*_PIP, "index", "versions", *_ASK, name], capture_output=True, text=True,
                              timeout=120)
        found = re.search(rf"^{re.escape(name)} \(([^)]+)\)", proc.stdout, re.MULTILINE | re.IGNORECASE)
        if proc.returncode == 0 and found:
            return found.group(1)
        why = f"pip index versions: {(proc.stderr or proc.stdout).strip()[-300:]}"
    except subprocess.TimeoutExpired:
        why = "pip index versions: no answer in 120 s"
    with tempfile.TemporaryDirectory() as tmp:  # `pip index` is experimental: download the newest file instead
        try:
            proc = subprocess.run([*_PIP, "download", *_ASK, "--quiet", "--no-deps", "--dest", tmp, name],
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{why}; pip download: no answer in 300 s") from None
        for f in os.listdir(tmp):
            parse = parse_wheel_filename if f.endswith(".whl") else parse_sdist_filename
            try:
                return str(parse(f)[1])
            except ValueError:
                continue
        raise RuntimeError(f"{why}; pip download: {proc.stderr.strip()[-300:]}")


def _newest_or_why(name: str) -> tuple[str | None, str]:
    try:
        return _query_index(name), ""
    except Exception as err:  # no index here (offline): the supported releases only
        return None, f"the package index did not answer ({err})"


@functools.cache
def newest(name: str) -> tuple[str | None, str]:
    """(newest release on the index or None, why None). The first call asks about every peer at once."""
    if os.environ.get("RLHF_FAST_PEERS_NEWEST", "1") == "0":
        return None, "RLHF_FAST_PEERS_NEWEST=0"
    return _all_newest().get(name) or _newest_or_why(name)


@functools.cache
def _all_newest() -> dict[str, tuple[str | None, str]]:
    with concurrent.futures.ThreadPoolExecutor(len(DEPS)) as pool:
        return dict(zip(DEPS, pool.map(_newest_or_why, DEPS)))


def _extra(name: str) -> list[str]:
    pairs = (s.split("==", 1) for s in os.environ.get("RLHF_FAST_PEERS_EXTRA", "").replace(",", " ").split())
    return [v for n, v in pairs if n.lower() == name]


def _key(v: str):
    try:
        return (0, Version(v))
    except InvalidVersion:
        return (1, v)


def versions(name: str) -> list:
    """`pytest.param`s for the releases of `name` to test: every supported one, then the newest on the index if it
    is another (and RLHF_FAST_PEERS_EXTRA's); a skipped case saying so if the index cannot be asked."""
    ours = supported(name)
    latest, why = newest(name)
    found = sorted({*ours, *_extra(name), *([latest] if latest else [])} - set(ours), key=_key)
    params = [pytest.param(v, id=f"{name}{v}") for v in (*ours, *found)]
    if latest is None:
        params.append(pytest.param(None, id=f"{name}-newest", marks=pytest.mark.skip(
            reason=f"newest {name} release unknown: {why}; tested the supported {' / '.join(ours)} only")))
    return params


def _root() -> Path:
    return Path(os.environ.get("RLHF_FAST_PEERS_DIR", Path.home() / ".cache" / "rlhf_fast" / "peers"))


def _folder(label: str, reqs: tuple[str, ...]) -> Path:
    return _root() / f"{label}-{hashlib.sha1(' '.join(reqs).encode()).hexdigest()[:10]}"


def _peer_dir(name: str, version: str) -> Path:
    return _folder(f"{name}-{version}", (f"{name}=={version}",))


def _deps_dir(name: str) -> Path:
    return _folder(f"{name}-deps", DEPS[name])


def _pip_install(target: Path, reqs: tuple[str, ...]) -> None:
    done = target / ".installed"
    if done.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    cmd = [*_PIP, "install", "--quiet", "--no-deps", "--no-build-isolation", "--upgrade", "--target", str(target),
           *reqs]
    proc = subprocess.run(cmd, env=dict(os.environ, DS_BUILD_OPS="0"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"installing {' '.join(reqs)} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    done.write_text("\n".join(reqs) + "\n")


def _drop(folder: Path) -> None:
    """Take `folder` off sys.path and every module loaded from it out of sys.modules."""
    target = str(folder)
    while target in sys.path:
        sys.path.remove(target)
    for mod in [m for m, v in sys.modules.items() if str(getattr(v, "__file__", "") or "").startswith(target)]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def install(name: str, version: str | None = None) -> Path:
    """The folder holding release `version` of `name` (default: its plug-in's first supported release), installed
    with its pinned dependencies on first use (an error if pip fails), put on sys.path in place of any other
    release of `name` this process loaded."""
    version = version or supported(name)[0]
    peer, deps = _peer_dir(name, version), _deps_dir(name)
    if _loaded.get(name) not in (None, version):
        _drop(_peer_dir(name, _loaded[name]))  # the dependencies stay loaded: they are the same pins
    _pip_install(deps, DEPS[name])
    _pip_install(peer, (f"{name}=={version}",))
    for folder in (peer, deps):  # the peer's folder first: a newer release wins over a copy among the deps
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    _loaded[name] = version
    importlib.invalidate_caches()
    return peer


@contextlib.contextmanager
def plugin(name: str, version: str | None = None, *, forget_after: bool = False):
    """Install release `version` of `name` (see `install`) and yield a fresh import of its plug-in module.

    A release outside the plug-in's SUPPORTED_VERSIONS (the newest on the index, RLHF_FAST_PEERS_EXTRA's) runs with
    RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1 inside the block, so that its tests show whether the plug-in works on it.
    `forget_after`: `forget(name)` on leaving."""
    version = version or supported(name)[0]
    peer = install(name, version)
    spec = importlib.util.find_spec(name)
    origin = str(spec.origin if spec else None)
    if not origin.startswith(str(peer)):
        raise RuntimeError(f"{name} imports from {origin}, not from the test's {name}=={version} in {peer}: "
                           f"uninstall {name} from this interpreter to run its integration tests")
    pkg = sys.modules["rlhf_fast.integrations"]
    for short in (name, f"{name}_plugin"):  # a fresh plug-in: no classes cached from another release
        sys.modules.pop(f"rlhf_fast.integrations.{short}", None)
        pkg.__dict__.pop(short, None)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if version not in supported(name):
                mp.setenv(_versions.ALLOW_ENV, "1")
            yield importlib.import_module(f"rlhf_fast.integrations.{name}")
    finally:
        if forget_after:
            forget(name)


def forget(name: str) -> None:
    """Take `name`'s folders off `sys.path` and drop every module loaded from them, so that the next test module
    does not see this peer's extra packages (OpenRLHF's deepspeed makes accelerate and TRL take their DeepSpeed
    paths, which a fresh accelerate import without deepspeed did not set up)."""
    if name in _loaded:
        _drop(_peer_dir(name, _loaded.pop(name)))
    _drop(_deps_dir(name))


def load_openrlhf_loss(version: str | None = None):
    """`openrlhf.models.loss` of release `version` (default: the first supported), the peer's own module.

    `openrlhf/models/__init__.py` imports the actor, which needs flash-attn (CUDA-only) at import time; the loss
    module does not. Without flash-attn, the `openrlhf.models` package is registered without running its
    `__init__` (its submodules then load from their own files, unchanged) so that `loss.py` and `utils.py` import.
    """
    install("openrlhf", version)
    if "openrlhf.models.loss" in sys.modules:
        return sys.modules["openrlhf.models.loss"]
    if importlib.util.find_spec("flash_attn") is None and "openrlhf.models" not in sys.modules:
        import openrlhf

        pkg = Path(openrlhf.__path__[0]) / "models"
        spec = importlib.util.spec_from_file_location("openrlhf.models", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        sys.modules["openrlhf.models"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("openrlhf.models.loss")


def assert_declared(plugin_module, name: str) -> None:
    """The release under test is one the plug-in declares; if not (the newest on the index, untested so far, or one
    of RLHF_FAST_PEERS_EXTRA), the failure says what to do."""
    version = plugin_module._versions.installed_version(name)
    assert version in plugin_module.SUPPORTED_VERSIONS, (
        f"{name} {version} (the newest release the package index serves, or RLHF_FAST_PEERS_EXTRA's) is tested "
        f"here with {plugin_module._versions.ALLOW_ENV}=1 but is not in "
        f"{plugin_module.__name__}.SUPPORTED_VERSIONS {plugin_module.SUPPORTED_VERSIONS}: if the other "
        f"[{name}{version}] tests pass, add it there and to the README's table; if not, the plug-in needs work")


def assert_refuses(monkeypatch, plugin_module, name: str, *calls) -> None:
    """With the installed version read as one outside SUPPORTED_VERSIONS (the peer's code untouched), each of
    `calls` raises UnsupportedPeerVersion naming the installed and the supported releases and the override; with
    RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1 each warns and runs."""
    versions = plugin_module._versions
    monkeypatch.setattr(versions, "installed_version", lambda dist: "0.0.1" if dist == name else None)
    monkeypatch.setattr(versions, "_warned", set())
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    supported_text = re.escape(" / ".join(plugin_module.SUPPORTED_VERSIONS))
    for call in calls:
        with pytest.raises(versions.UnsupportedPeerVersion,
                           match=rf"supports {name} {supported_text} .*the installed {name} is 0\.0\.1.*"
                                 rf"{versions.ALLOW_ENV}=1"):
            call()
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    for call in calls:
        monkeypatch.setattr(versions, "_warned", set())
        with pytest.warns(RuntimeWarning, match=r"installed .* is 0\.0\.1.*Running anyway"):
            call()
