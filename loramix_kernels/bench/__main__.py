"""``python -m loramix_kernels.bench [SUITE ...] [options]``: time the ops against their baselines.

Runs every suite shipped in this package (``bench_<family>.py``) on whatever device is present:
on CPU with pinned threads (``--threads``, default 1), interleaved repetitions, medians with their
interquartile range, and speedups over the baselines measured in the same run as the headline
figure. Every column and option is explained by ``python -m loramix_kernels.bench --help``.
"""

from .runner import main

if __name__ == "__main__":
    main()
