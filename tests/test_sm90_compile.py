"""Every Triton kernel compiles for Hopper (sm_90) at the launchers' real GPU tile choices, within
the H100's shared-memory limit and without register spills. Runs on CPU: see tests/sm90_compile.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sm90_compile import SM90_SMEM

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "routed_lora": {"_routed_lora_token_major_kernel", "_routed_lora_sorted_kernel",
                    "_sorted_shrink_kernel", "_sorted_expand_kernel"},
    "routed_lora_backward": {"_routed_lora_bwd_shrink_kernel", "_routed_lora_bwd_expand_kernel"},
    "routing": {"_route_topk_kernel"},
    "sharding": {"_routed_lora_shrink_kernel", "_routed_lora_expand_kernel"},
    "lm_head": {"_lm_head_topk_partial_kernel", "_lm_head_topk_merge_kernel", "_kv_write_kernel",
                "_compact_kv_layers_kernel"},
    "tree": {"_build_tree_kernel", "_tree_attention_kernel", "_tree_attention_merge_kernel"},
    "verify": {"_verify_greedy_kernel", "_verify_sampling_kernel", "_match_branch_kernel",
               "_separate_recover_kernel", "_separate_accept_kernel", "_compact_kv_kernel"},
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_kernels_compile_for_sm90(scenario):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAMIX_BACKEND")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tests.sm90_compile", scenario], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} >= EXPECTED[scenario]
    for r in rows:
        assert r["shared"] <= SM90_SMEM, r
        # Register spills (local-memory traffic in the inner loops) are a tile-table bug; ptxas
        # sometimes parks a scalar or two on the stack even at low register use (4-byte spills at
        # 80 registers), which costs nothing, hence the few bytes of slack.
        assert r["spill_stores"] <= 16, r
