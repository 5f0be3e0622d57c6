"""Opt-in plug-ins that put `rlhf_fast.ops` inside other trainers: `verl`, `trl`, `openrlhf`.

Each module imports its peer lazily and changes nothing of it until one of its functions is called; the rest of
rlhf_fast never imports a peer. Each declares the peer releases it is tested against as `SUPPORTED_VERSIONS` and
refuses any other (`_versions.UnsupportedPeerVersion`; RLHF_FAST_ALLOW_UNSUPPORTED_PEERS=1 overrides); the README,
"Inside your trainer", has the table.
"""
