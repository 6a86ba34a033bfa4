"""Benchmarks that drive real Shepherd processes; run them with `make bench`, not pytest.

They live outside `tests/` because they measure (throughput, latency percentiles) rather than
assert behaviour, take minutes, and their figures only mean something on a quiet machine.
"""
