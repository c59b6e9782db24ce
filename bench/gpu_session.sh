#!/usr/bin/env bash
# One-call GPU session. A lent H100 / H200 starts bare, allows ~10 minutes per command and ~15 minutes
# in all, so ONE run must measure everything and leave time to run it again:
#   bash bench/gpu_session.sh all        build, CUDA tests, memcheck of the adversarial CUDA tests,
#                                        compact benchmark (the issues' headline shapes), the demo;
#                                        everything as JSON in bench/results/ (and $OUT if set). <= 8 min.
#   bash bench/gpu_session.sh test       build, then the whole test suite on CUDA
#   bash bench/gpu_session.sh bench [SUITE...]   build, then the full-shape benchmarks
#   bash bench/gpu_session.sh demo       build, then the demo (JSON + plot)
# The machine's own torch / triton are used; nothing is downloaded (the image has no package index).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
start=$(date +%s)
out=${OUT:-/tmp/loramix_gpu}
mkdir -p "$out" bench/results
elapsed() { echo $(( $(date +%s) - start )); }

LORAMIX_BUILD_NATIVE=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
tag="${name}_$(date +%Y-%m-%d)"
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)

run_tests() {  # $1: timeout (s); remaining: pytest selection
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -q -n 8 -p no:cacheprovider "$@" 2>&1 | tee "$out/pytest_cuda.log" | tail -25
  return "${PIPESTATUS[0]}"
}

run_sanitizer() {  # memcheck over the adversarial tables' CUDA rows (strided views, bad ids/parents
  # with value checks off, garbage in unused cache slots); some machines refuse the tool: say so
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer: not installed on this machine" | tee "$out/sanitizer.log"; return 0
  fi
  timeout "$1" compute-sanitizer --tool memcheck --error-exitcode 17 --print-limit 20 \
    python3 -m pytest -q -p no:xdist -p no:cacheprovider -k "cuda" tests/test_routed_lora_adversarial.py \
      tests/test_tree_adversarial.py tests/test_verify_adversarial.py 2>&1 | tee "$out/sanitizer.log" | tail -15
  return "${PIPESTATUS[0]}"
}

stage=${1:-all}
shift || true
case "$stage" in
  all)
    run_tests 240 -x -m "not slow" --ignore=tests/test_install.py --ignore=tests/test_sm90_compile.py tests
    tests_rc=$?
    echo "[$(elapsed) s] tests rc=$tests_rc"
    run_sanitizer 90; san_rc=$?
    echo "[$(elapsed) s] sanitizer rc=$san_rc"
    json="bench/results/${tag}_compact.json"
    timeout 150 python3 -m loramix_kernels.bench --compact --json "$json"; bench_rc=$?
    echo "[$(elapsed) s] bench rc=$bench_rc"
    demo_rc=skipped
    if python3 -c "import loramix_kernels.demo" 2>/dev/null && [ "$(elapsed)" -lt 360 ]; then
      timeout $(( 450 - $(elapsed) )) python3 -m loramix_kernels.demo --device cuda \
        --json "bench/results/${tag}_demo.json" --plot "bench/results/${tag}_demo.png"; demo_rc=$?
    fi
    echo "[$(elapsed) s] demo rc=$demo_rc"
    python3 - "$out/session.json" <<EOF
import json, re, sys
log = open("$out/pytest_cuda.log").read()
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log.splitlines()[-1] if log else "")}
json.dump({"commit": "$commit", "device": "$name", "tests_rc": $tests_rc, "tests": counts,
           "sanitizer_rc": $san_rc, "bench_rc": $bench_rc, "demo_rc": "$demo_rc",
           "seconds": $(elapsed)}, open(sys.argv[1], "w"), indent=1)
EOF
    cp "$out/session.json" "bench/results/${tag}_session.json"
    cp bench/results/"${tag}"_* "$out/" 2>/dev/null || true
    ;;
  test)
    run_tests 540 tests
    ;;
  bench)
    json="bench/results/${tag}$( [ $# -gt 0 ] && printf '_%s' "$@").json"
    python3 -m loramix_kernels.bench --full --json "$json" "$@"
    cp "$json" "$out/"
    ;;
  demo)
    python3 -m loramix_kernels.demo --device cuda --json "bench/results/${tag}_demo.json" \
      --plot "bench/results/${tag}_demo.png"
    cp bench/results/"${tag}"_demo.* "$out/" 2>/dev/null || true
    ;;
  *) echo "usage: $0 all | test | bench [suite ...] | demo" >&2; exit 2 ;;
esac
