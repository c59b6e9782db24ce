"""Benchmark runner: times our ops against their baselines in one run, on one device.

Each suite ``loramix_kernels/bench/bench_<family>.py`` provides

* ``cases(quick: bool) -> list[dict]``: the shapes (``quick`` = small CPU shapes);
* ``make_inputs(case, device) -> dict``: one setup factory shared with the pytest-benchmark tests;
* ``candidates(case, inputs) -> dict[str, callable]``: ours first (key ``"loramix"``), then the
  baselines, imported from ``loramix_kernels.reference`` (never private copies);
* ``traffic_bytes(case) -> int``: the minimum HBM traffic the roofline fraction is measured against;
* optionally ``flops(case) -> int``.

Per case and candidate the runner reports time, effective GB/s, the fraction of the device's HBM
roofline, and our speedup over each baseline; it writes everything as JSON. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SUITES = ("routed_lora", "tree", "verify")

# Spec-sheet peaks: (HBM bytes/s, dense bf16 FLOP/s). Matched by substring of the device name.
PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
}


def device_peaks(device: torch.device):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None, None


def time_fn(fn, device: torch.device, quick: bool) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    reps, times = (3 if quick else 10), []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_suite(name: str):
    return importlib.import_module(f"loramix_kernels.bench.bench_{name}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def run(suites=SUITES, quick: bool | None = None, device: str | None = None, out: str | None = None):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quick is None:
        quick = dev.type != "cuda"
    bw, peak_flops = device_peaks(dev)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    records = []
    print(f"# loramix_kernels benchmarks on {dev_name} ({dev.type}); quick={quick}; "
          f"HBM peak={'%.2f TB/s' % (bw / 1e12) if bw else 'n/a'}")
    for suite_name in suites:
        suite = load_suite(suite_name)
        print(f"\n## {suite_name}")
        print(f"{'case':<58} {'impl':<14} {'time_us':>10} {'GB/s':>9} {'%HBM':>6} {'ours x':>7}")
        for case in suite.cases(quick):
            inputs = suite.make_inputs(case, dev)
            nbytes = suite.traffic_bytes(case)
            nflops = suite.flops(case) if hasattr(suite, "flops") else None
            label = ",".join(f"{k}={v}" for k, v in case.items())
            times = {}
            for impl, fn in suite.candidates(case, inputs).items():
                try:
                    times[impl] = time_fn(fn, dev, quick)
                except Exception as exc:  # a baseline may not support a shape (e.g. OOM)
                    print(f"{label:<58} {impl:<14} failed: {type(exc).__name__}: {str(exc)[:60]}")
            ours = times.get("loramix")
            for impl, t in times.items():
                gbps = nbytes / t / 1e9
                rec = {
                    "suite": suite_name, "case": case, "impl": impl, "time_s": t,
                    "bytes": nbytes, "GBps": gbps, "hbm_fraction": (nbytes / t / bw) if bw else None,
                    "flops": nflops, "tflops": (nflops / t / 1e12) if nflops else None,
                    "flops_fraction": (nflops / t / peak_flops) if (nflops and peak_flops) else None,
                    "ours_speedup": (t / ours) if (ours and impl != "loramix") else None,
                }
                records.append(rec)
                frac = f"{100 * rec['hbm_fraction']:.1f}" if bw else "-"
                spd = f"{rec['ours_speedup']:.2f}" if rec["ours_speedup"] else "-"
                print(f"{label:<58} {impl:<14} {t * 1e6:>10.1f} {gbps:>9.1f} {frac:>6} {spd:>7}")
            del inputs
    result = {
        "device": dev_name, "device_type": dev.type, "hbm_peak_Bps": bw, "flops_peak": peak_flops,
        "torch": torch.__version__, "triton": _triton_version(), "commit": git_commit(),
        "date": _dt.date.today().isoformat(), "quick": quick, "records": records,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {out}")
    return result


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suites", nargs="*", default=list(SUITES), help=f"any of {SUITES}")
    p.add_argument("--quick", action="store_true", default=None, help="small shapes (default on CPU)")
    p.add_argument("--full", dest="quick", action="store_false", help="the issue's full shapes")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write results here (bench/results/<device>_<date>.json)")
    args = p.parse_args(argv)
    for s in args.suites:
        if s not in SUITES:
            p.error(f"unknown suite {s!r}; choose from {SUITES}")
    run(args.suites, quick=args.quick, device=args.device, out=args.json)


if __name__ == "__main__":
    main()
