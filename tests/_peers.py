"""The peers' real packages for the integration tests, installed once into a cache folder.

Each peer (verl, TRL, OpenRLHF) is installed with `pip install --no-deps --target DIR` together with only the few
packages its imported modules need (the trainers' full dependency sets pull in vLLM, flash-attn and CUDA wheels),
all pinned, into `$RLHF_FAST_PEERS_DIR` (default `~/.cache/rlhf_fast/peers`) / a key of the pins. The first run
downloads from PyPI (about 500 MB, a minute or two); later runs only add the folder to `sys.path`, after the
interpreter's own packages so that torch, transformers and numpy stay the installed ones. Nothing of a peer is
stubbed: the tests import and call the peers' own functions.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# The versions the integration tests cover (also in the README's "Inside your trainer").
PEERS = {
    "verl": ("verl==0.9.1", "ray==2.60.0", "tensordict==0.10.0", "omegaconf==2.4.0",
             "antlr4-python3-runtime==4.9.3", "msgpack==1.2.4", "protobuf==7.36.2", "pyvers==0.2.3",
             "codetiming==1.4.0",
             # verl imports requests, ray jsonschema, tensordict cloudpickle and orjson: a fresh venv of ours has none
             "requests==2.34.2", "urllib3==2.7.0", "certifi==2026.5.20", "charset-normalizer==3.4.7",
             "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==0.30.0",
             "attrs==26.1.0", "cloudpickle==2.1.0", "orjson==3.8.3"),
    "trl": ("trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0", "pandas==3.1.1", "pyarrow==26.0.1",
            "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0"),
    # deepspeed (imported by openrlhf.models.utils) builds as pure Python with DS_BUILD_OPS=0
    "openrlhf": ("openrlhf==0.11.2", "deepspeed==0.19.8", "peft==0.21.2", "accelerate==1.15.0",
                 "hjson==3.1.0", "einops==0.8.2", "psutil==7.2.2", "msgpack==1.2.4"),
}


def _cache_dir(name: str) -> Path:
    root = Path(os.environ.get("RLHF_FAST_PEERS_DIR", Path.home() / ".cache" / "rlhf_fast" / "peers"))
    key = hashlib.sha1(" ".join(PEERS[name]).encode()).hexdigest()[:10]
    return root / f"{name}-{key}"


def install(name: str) -> Path:
    """The folder holding `name` and its few dependencies, installing them on first use (an error if pip fails)."""
    target = _cache_dir(name)
    done = target / ".installed"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-build-isolation", "--upgrade", "--target", str(target), *PEERS[name]]
        env = dict(os.environ, DS_BUILD_OPS="0")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"installing the peer {name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        done.write_text("\n".join(PEERS[name]) + "\n")
    if str(target) not in sys.path:
        sys.path.append(str(target))
        importlib.invalidate_caches()
    return target


def forget(name: str) -> None:
    """Take `name`'s folder off `sys.path` and drop every module loaded from it, so that the next test module
    does not see this peer's extra packages (OpenRLHF's deepspeed makes accelerate and TRL take their DeepSpeed
    paths, which a fresh accelerate import without deepspeed did not set up)."""
    target = str(_cache_dir(name))
    while target in sys.path:
        sys.path.remove(target)
    for mod in [m for m, v in sys.modules.items() if str(getattr(v, "__file__", "") or "").startswith(target)]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def load_openrlhf_loss():
    """`openrlhf.models.loss`, the peer's own module.

    `openrlhf/models/__init__.py` imports the actor, which needs flash-attn (CUDA-only) at import time; the loss
    module does not. Without flash-attn, the `openrlhf.models` package is registered without running its
    `__init__` (its submodules then load from their own files, unchanged) so that `loss.py` and `utils.py` import.
    """
    install("openrlhf")
    if "openrlhf.models.loss" in sys.modules:
        return sys.modules["openrlhf.models.loss"]
    if importlib.util.find_spec("flash_attn") is None and "openrlhf.models" not in sys.modules:
        import openrlhf

        pkg = Path(openrlhf.__path__[0]) / "models"
        spec = importlib.util.spec_from_file_location("openrlhf.models", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        sys.modules["openrlhf.models"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("openrlhf.models.loss")
