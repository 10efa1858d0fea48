"""Benchmarks: each module has `run() -> list[Row]`; `python -m bench` runs them all (make bench)."""
