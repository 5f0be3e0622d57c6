"""Opt-in plug-ins that put `rlhf_fast.ops` inside other trainers: `verl`, `trl`, `openrlhf`.

Each module imports its peer lazily and changes nothing of it until one of its functions is called; the rest of
rlhf_fast never imports a peer. Covered versions: see the README, "Inside your trainer".
"""
