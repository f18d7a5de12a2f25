"""Benchmark scripts (``python -m benchmarks.<name>``); their numbers live in
``benchmarks/README.md`` and their outputs under ``benchmarks/results/``."""
