"""Benchmark harness: ``python -m interest_kernels.bench`` (see ``__main__``)."""
