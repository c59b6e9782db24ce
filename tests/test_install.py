"""The package as a user gets it: a wheel installed outside the source tree.

The fixture builds a wheel of this checkout the way a plain ``pip install .`` does (no torch at
build time, so no native extension inside: ``LORAMIX_BUILD_NATIVE=0`` with
``--no-build-isolation`` gives the same wheel without downloading build tools), installs it into a
throwaway virtual environment that reuses this environment's torch / triton / pytest (a
``.pth`` file), and every check runs a fresh interpreter from a directory outside
the repository, with none of the test switches (``PYTHONPATH``, ``LORAMIX_BACKEND``,
``TRITON_INTERPRET``) inherited. Only ``test_native_compiled_on_first_use`` compiles (about a
minute on one core); the other checks keep ``LORAMIX_NATIVE=0`` or a missing compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SKIP = (".git", "build", "dist", "*.egg-info", "*.so", "*.pyd", "__pycache__", ".venv", ".whl",
         ".hypothesis", ".benchmarks", ".pytest_cache")


def _run(cmd, *, cwd, env, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


class Installed:
    """A virtual environment holding the installed wheel, and how to run Python in it."""

    def __init__(self, root: Path, wheel: Path, venv: Path):
        self.root, self.wheel, self.venv = root, wheel, venv
        self.python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        self.outside = root / "outside"  # the working directory: not the repository
        self.outside.mkdir(exist_ok=True)

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "LORAMIX_BACKEND", "TRITON_INTERPRET", "LORAMIX_NATIVE",
                            "LORAMIX_CACHE_DIR", "PYTHONSTARTUP")}
        env.update(PYTHONNOUSERSITE="1", LORAMIX_CACHE_DIR=str(self.root / "cache"))
        env.update(extra)
        return env

    def python_code(self, *parts: str, env=None, timeout=300):
        """Run the concatenated (each dedented) code parts in the venv, from outside the repo."""
        code = "\n".join(textwrap.dedent(p) for p in parts)
        return _run([self.python, "-c", code], cwd=self.outside, env=env or self.env(), timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a clean copy: no build/ leftovers (e.g. a _C.so) can enter the wheel
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*_SKIP))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LORAMIX_BUILD_NATIVE="0", PIP_NO_INPUT="1")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", root / "wheels", src], cwd=root, env=env)
    wheels = list((root / "wheels").glob("loramix_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    inst = Installed(root, wheels[0], venv)
    # Reuse this environment's packages (torch, triton, pytest, pip), whether it is the system's or
    # a virtual environment (where --system-site-packages would reach past it): a .pth file lists
    # its site directories after the venv's own. Their .pth files are not run, so an editable
    # install of this checkout there does not shadow the wheel.
    purelib = inst.python_code("import sysconfig; print(sysconfig.get_paths()['purelib'])",
                               env=inst.env()).stdout.strip()
    parent = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    Path(purelib, "_parent_environment.pth").write_text("\n".join(parent) + "\n")
    # No pip of its own: the reused one installs into the interpreter that runs it.
    _run([inst.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0]],
         cwd=root, env=inst.env())
    where = inst.python_code("import loramix_kernels; print(loramix_kernels.__file__)",
                             env=inst.env(LORAMIX_NATIVE="0")).stdout.strip()
    assert Path(where).is_relative_to(venv), f"imported {where}, not the installed copy"
    return inst


def test_wheel_contents(installed):
    """Pure Python (the extension compiles on first use), with the C++ sources, suites, py.typed,
    licence and the declared dependencies."""
    assert installed.wheel.name.endswith("-py3-none-any.whl"), installed.wheel.name
    with zipfile.ZipFile(installed.wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for required in ("loramix_kernels/py.typed", "loramix_kernels/_native.py",
                     "loramix_kernels/bench/runner.py", "loramix_kernels/bench/__main__.py"):
        assert required in names, required
    shipped_cpp = {n.rsplit("/", 1)[1] for n in names if n.startswith("loramix_kernels/csrc/")}
    # .cpp, .h and flags.py (the compiler flags of the compile-on-first-use build)
    assert shipped_cpp == {p.name for p in (REPO / "csrc").glob("*") if p.suffix in (".cpp", ".h", ".py")}
    assert "flags.py" in shipped_cpp
    shipped_suites = {n.rsplit("/", 1)[1] for n in names if n.startswith("loramix_kernels/bench/bench_")}
    assert shipped_suites == {p.name for p in (REPO / "loramix_kernels/bench").glob("bench_*.py")}
    assert not any(n.endswith((".so", ".pyd")) for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Python: >=3.10" in meta
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert "torch>=2.6" in requires
    assert any(r.startswith("triton;") and 'platform_system == "Linux"' in r for r in requires), requires
    for extra, pkgs in {"test": ("pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"),
                        "hf": ("transformers", "peft", "safetensors")}.items():
        for pkg in pkgs:
            assert f'{pkg}; extra == "{extra}"' in requires, (extra, pkg)


def test_bench_cli_installed(installed):
    """``python -m loramix_kernels.bench``: --help explains every column; a tiny run without
    pytest pins threads, reports median / IQR / speedup, progress, and the JSON."""
    env = installed.env(LORAMIX_NATIVE="0")
    out = _run([installed.python, "-m", "loramix_kernels.bench", "--help"], cwd=installed.outside,
               env=env).stdout
    for word in ("impl", "speedup", "spd_iqr", "time_us", "iqr", "reps", "GB/s", "%HBM", "noisy",
                 "--threads", "--min-reps", "--budget", "--spread-limit", "--json", "--list",
                 "routed_lora", "tree", "verify"):
        assert word in out, f"--help does not mention {word}"
    js = installed.root / "bench.json"
    run = installed.python_code(f"""
        import runpy, sys
        sys.modules["pytest"] = None  # the runner must not need pytest
        sys.argv = ["bench", "verify", "-k", "verify_greedy", "--threads", "1", "--min-reps", "3",
                    "--budget", "0.01", "--json", {str(js)!r}]
        runpy.run_module("loramix_kernels.bench", run_name="__main__", alter_sys=True)
        """, env=env).stdout
    result = json.loads(js.read_text())
    assert result["threads"] == 1 and result["device_type"] == "cpu" and result["min_reps"] == 3
    rows = {(json.dumps(r["case"], sort_keys=True), r["impl"]): r for r in result["records"]}
    n = len({case for case, _ in rows})
    assert n >= 1 and all(c["op"] == "verify_greedy" for c in (r["case"] for r in rows.values()))
    assert "threads: 1" in run and "[1/" in run and f"[{n}/{n} " in run, run
    assert "loramix" in {impl for _, impl in rows} and len({impl for _, impl in rows}) >= 2, rows.keys()
    for (case, impl), r in rows.items():
        assert "error" not in r, r
        assert r["reps"] >= 3 and 0 < r["q25_s"] <= r["time_s"] <= r["q75_s"], r
        assert r["noisy"] == (r["iqr_rel"] > 0.10 or (r["speedup_iqr_rel"] or 0) > 0.10)
        if impl == "torch":
            assert r["ours_speedup"] > 0 and r["speedup_iqr_rel"] is not None, r


_OPS_CHECK = """
    import torch
    import loramix_kernels
    from loramix_kernels import routed_lora, verify_greedy
    from loramix_kernels.reference.routed_lora import routed_lora_ref
    from loramix_kernels.reference.verify import verify_greedy_ref

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (4, 9), generator=g)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5]).expand(4, 9).contiguous()
    target = torch.randint(0, 3, (4, 9), generator=g)
    for got, want in zip(verify_greedy(tokens, parents, target), verify_greedy_ref(tokens, parents, target)):
        assert torch.equal(got, want), (got, want)
    x = torch.randn(5, 32, generator=g)
    a = [torch.randn(4, 8, 32, generator=g) * 0.1]
    b = [torch.randn(4, 16, 8, generator=g) * 0.1]
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [-1, -1]], dtype=torch.int32)
    gates = torch.rand(5, 2, generator=g)
    torch.testing.assert_close(routed_lora(x, a, b, ids, gates, 2.0), routed_lora_ref(x, a, b, ids, gates, 2.0))
"""


def _compiler_available() -> bool:
    import torch.utils.cpp_extension as cpp

    return shutil.which(os.environ.get("CXX") or "c++") is not None and cpp.is_ninja_available()


def test_native_compiled_on_first_use(installed):
    """A wheel without the extension compiles it against the running torch, caches it, and the
    ops use it; a second interpreter loads it from the cache without compiling."""
    if not _compiler_available():
        pytest.skip("no C++ compiler or ninja: test_no_compiler_warns_once covers this machine")
    code = """
        import json, sys
        import loramix_kernels
        from loramix_kernels import _native
        C = _native.load()
        assert C is not None, "native extension did not load"
        assert loramix_kernels._C is C and sys.modules["loramix_kernels._C"] is C
        print(json.dumps({"file": C.__file__}))
    """
    first = installed.python_code(code, _OPS_CHECK, timeout=600)
    info = json.loads(first.stdout.strip().splitlines()[-1])
    cache = installed.root / "cache"
    assert Path(info["file"]).is_relative_to(cache), info
    assert "compiling the native CPU kernels" in first.stderr
    assert (Path(info["file"]).parent / "built.txt").is_file()
    second = installed.python_code(code, _OPS_CHECK)
    assert json.loads(second.stdout.strip().splitlines()[-1])["file"] == info["file"]
    assert "compiling" not in second.stderr, second.stderr


def test_no_compiler_warns_once(installed):
    """Without a compiler: one RuntimeWarning saying why, and every checked op still works."""
    env = installed.env(CXX=str(installed.root / "no-such-compiler"),
                        LORAMIX_CACHE_DIR=str(installed.root / "cache-nocxx"))
    out = installed.python_code("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import loramix_kernels
            from loramix_kernels import _native
            assert _native.load() is None and _native.load() is None
        msgs = [str(w.message) for w in caught if "native CPU kernels unavailable" in str(w.message)]
        assert len(msgs) == 1, [str(w.message) for w in caught]
        assert "no C++ compiler" in msgs[0] and issubclass(caught[0].category, RuntimeWarning), msgs
        assert loramix_kernels._C is None
    """, _OPS_CHECK, "print('ok')", env=env)
    assert out.stdout.strip().endswith("ok")


def test_works_without_triton(installed):
    """triton is optional on CPU: with its import blocked the package imports, and the ops of
    every benchmark suite (routed_lora fwd / bwd, tree_attention, verify_*, compact_kv_) plus
    build_tree, match_branch and routed_lora_add_ run."""
    js = installed.root / "no_triton.json"
    out = installed.python_code(f"""
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch
        import loramix_kernels
        from loramix_kernels import _backend, build_tree, match_branch, routed_lora_add_
        assert not _backend.HAS_TRITON
        from loramix_kernels.bench import runner
        runner.run(min_reps=1, budget_s=0.0, out={str(js)!r})
        tm, depth, fc, ns = build_tree(torch.tensor([[-1, 0, 0, 1]]))
        assert depth.tolist() == [[0, 1, 1, 2]]
        reuse = match_branch(torch.tensor([[0, 2, -1, -1]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                             torch.tensor([7]), torch.tensor([[1, 2, 2]]), torch.tensor([[7, 5, 7]]))
        assert reuse.tolist() == [2], reuse
        out = torch.zeros(3, 16)
        routed_lora_add_(out, torch.randn(3, 32), [torch.randn(4, 8, 32)], [torch.randn(4, 16, 8)],
                         torch.tensor([[0], [1], [-1]], dtype=torch.int32), torch.ones(3, 1), 1.0)
        assert out[2].abs().sum() == 0 and out[0].abs().sum() > 0
    """, _OPS_CHECK, "print('ok')", env=installed.env(LORAMIX_NATIVE="0"))
    assert out.stdout.strip().endswith("ok")
    failed = [r for r in json.loads(js.read_text())["records"] if r["impl"] == "loramix" and "error" in r]
    assert not failed, failed


def test_runner_statistics():
    """Quartiles, spreads and paired speedups as the runner reports them (synthetic timings)."""
    from loramix_kernels.bench import runner

    ours = [1.0, 1.0, 1.1, 1.0, 0.9]
    base = [2.0, 2.2, 2.2, 8.0, 1.8]  # one disturbed round: a paired ratio absorbs it
    stats = runner.summarise({"loramix": {"times": ours, "calls": 4}, "torch": {"times": base, "calls": 1},
                              "broken": ValueError("no such shape")})
    assert stats["loramix"]["q"] == (1.0, 1.0, 1.0) and stats["loramix"]["speedup"] is None
    assert stats["torch"]["speedup"] == 2.0  # median of 2, 2.2, 2, 8, 2 (per-round ratios)
    assert stats["torch"]["speedup_q"] == (2.0, 2.0, 2.2)
    assert stats["torch"]["q"] == (2.0, 2.2, 2.2) and stats["torch"]["reps"] == 5
    assert abs(stats["torch"]["iqr_rel"] - 0.2 / 2.2) < 1e-12
    assert stats["broken"] == {"error": "ValueError: no such shape", "speedup": None, "speedup_q": None}
    # CUDA-style quartiles (no per-round times): the speedup is the ratio of medians
    cuda = runner.summarise({"loramix": {"quartiles": (1.0, 2.0, 3.0)}, "torch": {"quartiles": (5.0, 6.0, 7.0)}})
    assert cuda["torch"]["speedup"] == 3.0 and cuda["torch"]["speedup_q"] is None


def test_runner_imports_suites_without_pytest(monkeypatch):
    """The suites' module-level pytest decorators get a stand-in only while pytest is missing,
    and sys.modules is left as it was."""
    from loramix_kernels.bench import runner

    monkeypatch.setitem(sys.modules, "pytest", None)  # `import pytest` raises ImportError
    for name in runner.SUITES:
        monkeypatch.delitem(sys.modules, f"loramix_kernels.bench.bench_{name}", raising=False)
        suite = runner.load_suite(name)
        assert callable(suite.cases) and callable(suite.candidates) and suite.cases(True)
        assert sys.modules["pytest"] is None
    assert runner.SUITES == tuple(sorted(p.stem[6:] for p in (REPO / "loramix_kernels/bench").glob("bench_*.py")))
