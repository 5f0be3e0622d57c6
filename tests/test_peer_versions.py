"""Which peer releases the integration tests run against (tests/_peers.py `versions`): every release a plug-in
declares, plus the newest the package index serves when that is another, once each; without an index, a skipped
case that says so. No download: the index lookup is replaced here."""
import subprocess

import pytest

import _peers


def _ids(params):
    return [(p.id, p.values[0], [m.kwargs.get("reason", "") for m in p.marks]) for p in params]


def _clear():
    _peers.newest.cache_clear()
    _peers._all_newest.cache_clear()


@pytest.fixture
def index(monkeypatch):
    """Set the answer of the index lookup: a version, or an exception."""
    answer = {}

    def query(name):
        if isinstance(answer["v"], Exception):
            raise answer["v"]
        return answer["v"]

    monkeypatch.setattr(_peers, "_query_index", query)
    monkeypatch.delenv("RLHF_FAST_PEERS_EXTRA", raising=False)
    monkeypatch.delenv("RLHF_FAST_PEERS_NEWEST", raising=False)
    _clear()
    yield answer
    _clear()


@pytest.mark.parametrize("name", ["trl", "verl", "openrlhf"])
def test_newest_equal_to_a_supported_release_runs_once(index, name):
    index["v"] = _peers.supported(name)[-1]
    assert _ids(_peers.versions(name)) == [(f"{name}{v}", v, []) for v in _peers.supported(name)]


def test_newer_release_is_added_after_the_supported(index, monkeypatch):
    monkeypatch.setattr(_peers, "supported", lambda name: ("1.16.0",))
    index["v"] = "1.17.0"
    assert _ids(_peers.versions("trl")) == [("trl1.16.0", "1.16.0", []), ("trl1.17.0", "1.17.0", [])]
    monkeypatch.setenv("RLHF_FAST_PEERS_EXTRA", "trl==1.15.2 verl==0.1")
    assert [p.values[0] for p in _peers.versions("trl")] == ["1.16.0", "1.15.2", "1.17.0"]


def test_no_index_falls_back_to_the_supported_with_a_skip_reason(index, monkeypatch):
    monkeypatch.setattr(_peers, "supported", lambda name: ("1.16.0",))
    index["v"] = RuntimeError("pip index versions: no such host")
    (pin, newest), = [_ids(_peers.versions("trl"))]
    assert pin == ("trl1.16.0", "1.16.0", [])
    assert newest[:2] == ("trl-newest", None)
    assert "newest trl release unknown" in newest[2][0] and "no such host" in newest[2][0]
    assert "tested the supported 1.16.0 only" in newest[2][0]
    _clear()
    monkeypatch.setenv("RLHF_FAST_PEERS_NEWEST", "0")
    assert "RLHF_FAST_PEERS_NEWEST=0" in _ids(_peers.versions("trl"))[1][2][0]


def test_index_answer_is_parsed(monkeypatch):
    out = "trl (1.17.0)\nAvailable versions: 1.17.0, 1.16.0\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, out, "WARNING: x"))
    assert _peers._query_index("trl") == "1.17.0"
