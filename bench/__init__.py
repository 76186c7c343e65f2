"""Benchmarks of asyncapp's bundled server against peer servers.

Run ``python -m bench`` (``--quick`` for a short pass, ``--only SCENARIO``
for one scenario); see ``docs/benchmarks.md``. Peer servers run from a
separate virtualenv (``.bench-venv/``) that the entry point creates, so
nothing here is imported by asyncapp and asyncapp is not installed there.
"""
