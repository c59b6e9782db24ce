"""``python -m loramix_kernels.bench``: run the benchmark suites on whatever device is present.

Prints one table per op family (ours against each baseline, time, GB/s, fraction of the HBM
roofline, speedup). Options: ``python -m loramix_kernels.bench --help``.
"""

from .runner import main

if __name__ == "__main__":
    main()
