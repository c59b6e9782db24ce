"""Times loramix_kernels' ops against their baselines, in one run, on one device.

Each suite ``loramix_kernels/bench/bench_<family>.py`` (found automatically) provides

* ``cases(quick: bool) -> list[dict]``: the shapes (``quick`` = small CPU shapes);
* ``make_inputs(case, device) -> dict``: one setup factory shared with the pytest-benchmark tests;
* ``candidates(case, inputs) -> dict[str, callable]``: ours first (key ``"loramix"``), then the
  baselines: plain-PyTorch ones imported from ``loramix_kernels.reference`` (never private
  copies), Triton ones (e.g. the two-launch shrink / expand of vLLM's design) defined in the suite;
* ``traffic_bytes(case) -> int``: the minimum HBM traffic the roofline fraction is measured against;
* optionally ``flops(case) -> int``;
* optionally ``peak_memory(fn, device) -> int | None``: bytes one call of ``fn`` allocates at its
  peak above what was resident before (recorded as ``peak_bytes``, printed as ``peak_MiB``);
* optionally ``RATIO_TO = "<impl>"``: every candidate's median time is also reported as a ratio to
  that candidate's (``ratio``; the model-level suite's ``"base"``, in which its targets are stated);
* ``headline_cases() -> list[dict]``: the few full-size shapes the issues name as targets, run by
  ``--compact`` (one GPU session measures every suite's headline in a few minutes).

How it measures. CPU: the thread count is pinned (``--threads``, default 1); after one warm-up
call each, the candidates of a case run in interleaved rounds (rotating order, garbage collector
off), each round timing one chunk of calls per candidate (enough calls to last about a
millisecond), for at least ``--min-reps`` rounds and until each candidate has had ``--budget``
seconds. A background disturbance thus hits every candidate of the round alike, and the speedup is
the median of the per-round time ratios. CUDA: ``triton.testing.do_bench`` per candidate (L2
flushed between calls, ``--budget`` seconds of repetitions), its quartiles reported; the speedup is
the ratio of medians. Nothing is asserted: suites' pytest tests check correctness.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def discover_suites() -> tuple[str, ...]:
    """Every ``bench_<name>.py`` shipped in this package, by name."""
    return tuple(sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py")))


SUITES = discover_suites()

# Spec-sheet peaks: (HBM bytes/s, dense bf16 FLOP/s). Matched by substring of the device name.
PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
}

DEFAULT_BUDGET_S = {"cpu": 0.2, "cuda": 0.1}
CHUNK_S = 1e-3  # CPU: a timed chunk repeats a fast call until it lasts about this long
MAX_ROUNDS = 100_000

COLUMNS = """\
columns (one row per implementation of a case; a case starts with its [i/n] progress line):
  impl      the implementation: "loramix" (ours) first, then the suite's baselines; on CPU
            "cpu_kernel" is the op's CPU kernel called directly (no dispatch, no validation):
            loramix's speedup over it (< 1) is the per-call host overhead, and the baselines'
            times against its time compare the kernels alone. Ops with a direct C++ kernel
            (lm_head_topk, route_topk, tree_attention: their CPU calls never enter Python) have
            no Python layer
            to measure: there "cpu_kernel" is their native kernel called as a private op, and
            the op's checks and dispatch cost what loramix's speedup over it falls short of 1
  speedup   loramix's speedup over this implementation, measured in the same run: its time /
            loramix's time (CPU: median of the per-round ratios; CUDA: ratio of the medians);
            > 1: loramix is faster. The headline figure: on CPU absolute times depend on the
            machine and its load, their ratios much less
  spd_iqr   spread of that speedup: interquartile range / median of the per-round ratios (CPU;
            "-" on CUDA, where candidates are timed one after the other)
  time_us   median time of one call, microseconds (CPU: read it relative to loramix's row)
  iqr       interquartile range / median of the timed repetitions: their spread
  reps      CPU: rounds x calls per round (each round's time is its chunk's mean, the median is
            over rounds); CUDA: "-" (do_bench chooses)
  GB/s      CUDA only: the suite's minimum traffic (traffic_bytes) / median time
  %HBM      CUDA only: GB/s as a fraction of the device's spec-sheet HBM bandwidth
  peak_MiB  suites with a peak_memory hook (training): memory one call allocates at its peak
  x<impl>   suites with RATIO_TO (model): median time / that implementation's (e.g. x base)
  note      "noisy" when iqr or spd_iqr exceeds --spread-limit (rerun with more --budget, fewer
            --threads, or on a quieter machine); "failed: ..." when the call raised
The JSON (--json) holds the same per row (time_s = median, q25_s, q75_s, ...) plus the settings."""


# ----------------------------------------------------------------------------------------------
# suites
# ----------------------------------------------------------------------------------------------


class _PassThrough:
    """``pytest.mark.<anything>(...)`` and ``pytest.fixture(...)`` as no-op decorators."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn


@contextlib.contextmanager
def _pytest_stand_in():
    """Let a suite's module-level pytest decorators import where pytest is not installed.

    The suites double as pytest-benchmark files (``import pytest`` at the top, decorated test
    functions); the runner needs only their plain functions, so without pytest a stand-in module
    whose ``mark`` / ``fixture`` decorate to nothing is visible while the suite imports.
    """
    try:
        import pytest  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    stub = types.ModuleType("pytest", "stand-in used by loramix_kernels.bench.runner: pytest is not installed")
    stub.mark = stub.fixture = _PassThrough()
    saved = sys.modules.get("pytest", ...)
    sys.modules["pytest"] = stub
    try:
        yield
    finally:
        if saved is ...:
            sys.modules.pop("pytest", None)
        else:
            sys.modules["pytest"] = saved


def load_suite(name: str):
    with _pytest_stand_in():
        return importlib.import_module(f"{__package__}.bench_{name}")


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _rel_iqr(q: tuple[float, float, float]) -> float:
    return (q[2] - q[0]) / q[1] if q[1] > 0 else math.inf


def measure_cpu(fns: dict, min_reps: int, budget_s: float) -> dict:
    """Interleaved rounds (see the module docstring): {impl: {"times", "calls"}} or an exception."""
    out, live = {}, {}
    for name, fn in fns.items():
        try:
            fn()  # warm-up: first-call costs (allocations, lazy imports, caches)
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
        except Exception as exc:  # a baseline may not support a shape
            out[name] = exc
            continue
        live[name] = (fn, max(1, min(10_000, int(CHUNK_S / max(once, 1e-9)))))
        out[name] = {"times": [], "calls": live[name][1]}
    names = list(live)
    if not names:
        return out
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start, rounds = time.perf_counter(), 0
        while rounds < MAX_ROUNDS:
            order = names[rounds % len(names):] + names[:rounds % len(names)]
            for name in order:
                fn, calls = live[name]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                out[name]["times"].append((time.perf_counter() - t0) / calls)
            rounds += 1
            if rounds >= min_reps and time.perf_counter() - start >= budget_s * len(names):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def measure_cuda(fns: dict, min_reps: int, budget_s: float) -> dict:
    """Per candidate: triton.testing.do_bench quartiles (without triton: synchronised wall time)."""
    out = {}
    for name, fn in fns.items():
        try:
            try:
                import triton.testing
            except ImportError:
                fn()
                torch.cuda.synchronize()
                times, start = [], time.perf_counter()
                while len(times) < min_reps or time.perf_counter() - start < budget_s:
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                out[name] = {"times": times, "calls": 1}
            else:
                q = triton.testing.do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1e3)),
                                            quantiles=[0.25, 0.5, 0.75])
                out[name] = {"quartiles": tuple(v * 1e-3 for v in q)}
        except Exception as exc:
            out[name] = exc
    return out


def summarise(raw: dict, ours: str = "loramix") -> dict:
    """{impl: stats} with quartiles, spread and the speedup of ``ours`` over each impl."""
    stats = {}
    for name, r in raw.items():
        if isinstance(r, Exception):
            stats[name] = {"error": f"{type(r).__name__}: {r}"}
            continue
        q = r["quartiles"] if "quartiles" in r else quartiles(r["times"])
        stats[name] = {"q": q, "iqr_rel": _rel_iqr(q), "reps": len(r.get("times", [])) or None,
                       "calls": r.get("calls")}
    base = raw.get(ours)
    for name, s in stats.items():
        s["speedup"] = s["speedup_q"] = None
        if name == ours or "q" not in s or "q" not in stats.get(ours, {}):
            continue
        r = raw[name]
        if "times" in r and "times" in base and len(r["times"]) == len(base["times"]):
            s["speedup_q"] = quartiles([t / o for t, o in zip(r["times"], base["times"])])
            s["speedup"] = s["speedup_q"][1]
        else:
            s["speedup"] = s["q"][1] / stats[ours]["q"][1]
    return stats


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def device_peaks(device: torch.device):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None, None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True)
    except OSError:
        return None
    if out.returncode != 0:  # e.g. an installed package, outside any repository
        return None
    return out.stdout.strip() or None


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": None}
    with contextlib.suppress(ImportError):
        import triton

        v["triton"] = triton.__version__
    return v


def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def run(suites=SUITES, quick: bool | None = None, device: str | None = None, out: str | None = None,
        threads: int = 1, min_reps: int = 5, budget_s: float | None = None,
        spread_limit: float = 0.10, select: str | None = None, compact: bool = False):
    """Run the suites; print the tables; return (and write to ``out``) the JSON-able result."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quick is None:
        quick = dev.type != "cuda"
    if threads > 0:
        torch.set_num_threads(threads)
    threads_used = torch.get_num_threads()
    if budget_s is None:
        budget_s = DEFAULT_BUDGET_S.get(dev.type, 0.2)
    bw, peak_flops = device_peaks(dev)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    measure = measure_cuda if dev.type == "cuda" else measure_cpu

    import loramix_kernels

    native = getattr(loramix_kernels, "_C", None) is not None
    plan = []
    for suite_name in suites:
        suite = load_suite(suite_name)
        for case in (suite.headline_cases() if compact else suite.cases(quick)):
            label = ",".join(f"{k}={v}" for k, v in case.items())
            if select is None or select in f"{suite_name}:{label}":
                plan.append((suite_name, suite, case, label))
    print(f"# loramix_kernels benchmarks: {dev_name} ({dev.type}), torch {torch.__version__}, "
          f"native CPU kernels {'loaded' if native else 'NOT loaded'}")
    print(f"# threads: {threads_used} (torch.set_num_threads; {available_cores()} cores available); "
          f"{'headline' if compact else 'quick' if quick else 'full'} shapes; {len(plan)} cases")
    if dev.type == "cuda":
        print(f"# timing: triton.testing.do_bench per candidate, {budget_s:g} s of reps; "
              f"HBM peak {'%.2f TB/s' % (bw / 1e12) if bw else 'n/a'}")
    else:
        print(f"# timing: interleaved rounds, >= {min_reps} rounds and >= {budget_s:g} s per "
              "candidate; CPU figures: read the speedup column, times only relative to each other")
    print(f"# spread: interquartile range / median; 'noisy' above {spread_limit:.0%}")

    records, noisy_cases, t_start, last_suite = [], [], time.perf_counter(), None
    header = f"  {'impl':<14} {'speedup':>8} {'spd_iqr':>8} {'time_us':>11} {'iqr':>6} {'reps':>9}"
    if dev.type == "cuda":
        header += f" {'GB/s':>8} {'%HBM':>6}"
    header += "  note"
    for i, (suite_name, suite, case, label) in enumerate(plan, 1):
        if suite_name != last_suite:
            print(f"\n## {suite_name}")
            last_suite = suite_name
        print(f"[{i}/{len(plan)} {time.perf_counter() - t_start:.0f}s] {suite_name}: {label}", flush=True)
        try:
            inputs = suite.make_inputs(case, dev)
        except Exception as exc:  # e.g. an optional dependency (transformers, peft) missing
            print(f"  setup failed: {type(exc).__name__}: {str(exc)[:100]}")
            records.append({"suite": suite_name, "case": case, "error": f"{type(exc).__name__}: {exc}"})
            continue
        nbytes = suite.traffic_bytes(case)
        nflops = suite.flops(case) if hasattr(suite, "flops") else None
        fns = suite.candidates(case, inputs)
        stats = summarise(measure(fns, min_reps, budget_s))
        ratio_to = getattr(suite, "RATIO_TO", None)
        ref_t = stats.get(ratio_to, {}).get("q", (None, None))[1] if ratio_to else None
        peaks = {}
        if hasattr(suite, "peak_memory"):
            for impl, fn in fns.items():
                if "error" not in stats[impl]:
                    peaks[impl] = suite.peak_memory(fn, dev)
        del inputs, fns
        extra = (f" {'peak_MiB':>8}" if peaks else "") + (f" {'x' + ratio_to:>8}" if ref_t else "")
        print(header.replace("  note", extra + "  note"))
        case_noisy = False
        for impl, s in stats.items():
            if "error" in s:
                print(f"  {impl:<14} {'-':>8} {'-':>8} {'-':>11} {'-':>6} {'-':>9}  failed: {s['error'][:80]}")
                records.append({"suite": suite_name, "case": case, "impl": impl, "error": s["error"]})
                continue
            q25, t, q75 = s["q"]
            spd_iqr = _rel_iqr(s["speedup_q"]) if s["speedup_q"] else None
            noisy = s["iqr_rel"] > spread_limit or (spd_iqr is not None and spd_iqr > spread_limit)
            case_noisy |= noisy
            gbps = nbytes / t / 1e9 if t > 0 else None
            rec = {
                "suite": suite_name, "case": case, "impl": impl, "time_s": t, "q25_s": q25, "q75_s": q75,
                "iqr_rel": s["iqr_rel"], "reps": s["reps"], "calls_per_rep": s["calls"],
                "ours_speedup": s["speedup"], "speedup_iqr_rel": spd_iqr, "noisy": noisy,
                "bytes": nbytes, "flops": nflops, "peak_bytes": peaks.get(impl),
                "ratio_to": ratio_to if ref_t else None, "ratio": (t / ref_t) if ref_t else None,
            }
            if dev.type == "cuda":
                rec.update({"GBps": gbps, "hbm_fraction": (nbytes / t / bw) if bw and t > 0 else None,
                            "tflops": (nflops / t / 1e12) if nflops and t > 0 else None,
                            "flops_fraction": (nflops / t / peak_flops) if nflops and peak_flops and t > 0 else None})
            records.append(rec)
            reps = f"{s['reps']}x{s['calls']}" if s["reps"] else "-"
            line = (f"  {impl:<14} {_fmt(s['speedup'], '.2f'):>8} {_fmt(spd_iqr, '.1%'):>8} "
                    f"{t * 1e6:>11.1f} {s['iqr_rel']:>6.1%} {reps:>9}")
            if dev.type == "cuda":
                frac = rec["hbm_fraction"]
                line += f" {_fmt(gbps, '.1f'):>8} {_fmt(frac * 100 if frac else None, '.1f'):>6}"
            if peaks:
                pk = peaks.get(impl)
                line += f" {_fmt(pk / 2 ** 20 if pk is not None else None, '.1f'):>8}"
            if ref_t:
                line += f" {_fmt(rec['ratio'], '.2f'):>8}"
            print(line + ("  noisy" if noisy else ""))
        if case_noisy:
            noisy_cases.append(f"{suite_name}: {label}")
    print(f"\n# {len(plan)} cases in {time.perf_counter() - t_start:.0f}s; "
          f"{len(noisy_cases)} with a spread above {spread_limit:.0%}")
    for c in noisy_cases:
        print(f"#   noisy: {c}")
    result = {
        "device": dev_name, "device_type": dev.type, "hbm_peak_Bps": bw, "flops_peak": peak_flops,
        **_versions(), "commit": git_commit(), "date": _dt.date.today().isoformat(), "quick": quick, "compact": compact,
        "threads": threads_used, "cores_available": available_cores(), "native_cpu_kernels": native,
        "min_reps": min_reps, "budget_s": budget_s, "spread_limit": spread_limit,
        "timing": "triton.testing.do_bench" if dev.type == "cuda" else "interleaved rounds",
        "noisy_cases": noisy_cases, "records": records,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out}")
    return result


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m loramix_kernels.bench",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[-1],
        epilog=COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"op families to run (default: all): {', '.join(SUITES)}")
    p.add_argument("--quick", action="store_true", default=None,
                   help="small shapes (the default on CPU)")
    p.add_argument("--full", dest="quick", action="store_false",
                   help="the full shapes of the issues (the default on CUDA)")
    p.add_argument("--compact", action="store_true",
                   help="only each suite's headline shapes (the issues' targets): one GPU session "
                        "measures every suite in a few minutes")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads, pinned for the whole run (default 1; 0 = leave torch's "
                        "default); stated in the output and the JSON")
    p.add_argument("--min-reps", type=_positive_int, default=5, metavar="N",
                   help="CPU: at least this many timed rounds per case (default 5)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time per candidate and case: CPU rounds continue until each candidate "
                        f"had this long, CUDA do_bench's rep (default {DEFAULT_BUDGET_S['cpu']} on "
                        f"CPU, {DEFAULT_BUDGET_S['cuda']} on CUDA)")
    p.add_argument("--spread-limit", type=float, default=0.10, metavar="FRACTION",
                   help="mark a row 'noisy' when its iqr or spd_iqr exceeds this (default 0.10)")
    p.add_argument("-k", dest="select", default=None, metavar="TEXT",
                   help="only cases whose 'suite: key=value,...' label contains TEXT")
    p.add_argument("--list", action="store_true", help="list the suites and their case counts, then exit")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results here (GPU runs: bench/results/<device>_<date>.json)")
    args = p.parse_args(argv)
    for s in args.suites:
        if s not in SUITES:
            p.error(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    if args.budget is not None and args.budget < 0:
        p.error("--budget must be >= 0")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    suites = args.suites or list(SUITES)
    if args.list:
        for s in suites:
            suite = load_suite(s)
            print(f"{s:<14} {len(suite.cases(True)):>4} quick cases, {len(suite.cases(False)):>5} full")
        return None
    return run(suites, quick=args.quick, device=args.device, out=args.json, threads=args.threads,
               min_reps=args.min_reps, budget_s=args.budget, spread_limit=args.spread_limit,
               select=args.select, compact=args.compact)


if __name__ == "__main__":
    main()


def add_cpu_kernel(candidates: dict, name, *args, native=None) -> dict:
    """``candidates`` plus, where the op runs its CPU kernel (CPU tensors, not the interpreter
    switch), ``"cpu_kernel"``: op ``name``'s CPU kernel called directly (``OPS[name].cpu``: no
    dispatcher, no validation). Next to the op's own row it measures the per-call host overhead.
    An op whose CPU kernel is a direct C++ kernel is measured through its native kernel as a
    private op: ``_<name>_cpu(*args)``, or ``native()`` where that op takes other arguments."""
    from .. import _backend
    from ..ops._registry import OPS

    t = next(a for a in args if isinstance(a, torch.Tensor))
    if t.device.type == "cpu" and not _backend.use_triton(t):
        kernel = OPS[name].cpu
        if OPS[name].direct:  # the op is a C++ kernel already: its native kernel, as a private op
            from .. import _native

            if native is not None:
                candidates["cpu_kernel"] = native
                return candidates
            kernel = _native.op(f"_{name}_cpu") or kernel
        candidates["cpu_kernel"] = lambda: kernel(*args)
    return candidates
