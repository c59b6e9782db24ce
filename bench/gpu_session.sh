#!/usr/bin/env bash
# One-call GPU session (a lent H100/H200 starts bare and allows ~10 minutes per command):
#   bash bench/gpu_session.sh test              build, then the whole test suite on CUDA
#   bash bench/gpu_session.sh bench [SUITE...]  build, then the full-shape benchmarks, JSON written to
#                                               bench/results/<device>_<date>.json (and $OUT if set)
# The machine's own torch / triton are used; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
stage=${1:-test}
shift || true
case "$stage" in
  test)
    python3 -m pytest -q -n 8 tests 2>&1 | tee ${OUT:-/tmp}/pytest_cuda.log
    ;;
  bench)
    name=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    json="bench/results/${name}_$(date +%Y-%m-%d)$( [ $# -gt 0 ] && printf '_%s' "$@").json"
    python3 -m loramix_kernels.bench --full --json "$json" "$@"
    [ -n "${OUT:-}" ] && cp "$json" "$OUT/"
    ;;
  *) echo "usage: $0 test | bench [suite ...]" >&2; exit 2 ;;
esac
