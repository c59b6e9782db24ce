"""``python -m loramix_kernels.bench``: run the benchmark suites on whatever device is present.

Prints one table per op family (ours against each baseline, time, GB/s, fraction of the HBM
roofline, speedup). Options are those of ``bench/runner.py`` (``--full``, ``--json PATH``, suite
names). Needs the repository checkout (an editable install), where the suites live in ``bench/``.
"""

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent.parent / "bench"


def main(argv=None):
    if not (_BENCH / "runner.py").exists():
        raise SystemExit(f"benchmark suites not found at {_BENCH}: run from a source checkout "
                         "installed with `pip install --no-build-isolation -e .`")
    sys.path.insert(0, str(_BENCH))
    import runner

    runner.main(argv)


if __name__ == "__main__":
    main()
