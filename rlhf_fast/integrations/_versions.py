"""The one version check every plug-in runs before it touches its peer.

Each plug-in declares the peer releases it is tested against as `SUPPORTED_VERSIONS` (an exact set: the plug-ins
re-implement the peers' loss and metric code, which changes between releases without a change of signature, so an
untested release may give a different loss without any error). On any other installed release the plug-in raises
`UnsupportedPeerVersion`, naming the installed and the supported versions; `RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1`
turns the error into a warning.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

ALLOW_ENV = "RLHF_FAST_ALLOW_UNSUPPORTED_PEERS"
_warned: set[tuple[str, str]] = set()


class UnsupportedPeerVersion(RuntimeError):
    """The installed peer release is not one the plug-in is tested against."""


def installed_version(dist: str) -> str:
    """The version of the peer package `dist` in use: its imported module's `__version__`, else the installed
    distribution's metadata."""
    version = getattr(sys.modules.get(dist), "__version__", None)
    if isinstance(version, str) and version[:1].isdigit():
        return version
    return importlib.metadata.version(dist)


def check(dist: str, supported: tuple[str, ...]) -> str:
    """The installed version of `dist`; raises UnsupportedPeerVersion if it is not in `supported` (a warning
    instead with RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1)."""
    try:
        version = installed_version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (no package metadata found)"
    if version in supported:
        return version
    where = getattr(sys.modules.get(dist), "__file__", None)
    msg = (f"rlhf_fast's {dist} plug-in supports {dist} {' / '.join(supported)} (the releases it is tested "
           f"against); the installed {dist} is {version}{f' ({where})' if where else ''}. Install a supported "
           f"release (pip install '{dist}=={supported[-1]}'), or set {ALLOW_ENV}=1 to run on this one untested "
           f"(losses, gradients and metrics may then differ from {dist}'s own without an error).")
    if os.environ.get(ALLOW_ENV, "") not in ("1", "true", "True", "yes"):
        raise UnsupportedPeerVersion(msg)
    if (dist, version) not in _warned:
        _warned.add((dist, version))
        warnings.warn(f"{msg} Running anyway: {ALLOW_ENV} is set.", RuntimeWarning, stacklevel=3)
    return version
