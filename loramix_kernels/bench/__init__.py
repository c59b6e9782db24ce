"""Benchmarks shipped with the package: the runner (``runner.py``, ``python -m loramix_kernels.bench``)
and one suite per op family (``bench_<family>.py``, also pytest-benchmark files)."""
