"""Benchmarks (not tests). Run from the repo root: ``.venv/bin/python -m bench.node_throughput``.

See ``docs/benchmarks.md`` for what each one measures and the last figures.
"""
