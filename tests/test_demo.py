"""A shortened run of ``python -m loramix_kernels.demo`` (tiny model, a few training steps):
losslessness, the JSON report's fields, the weight cache, the plot, and ``--help``."""

import json
import os
import subprocess
import sys

import pytest
import torch

import loramix_kernels

pytest.importorskip("transformers")

FIELDS = ("lossless", "plain_tokens_per_s", "mirror_tokens_per_s", "hf_assisted_tokens_per_s",
          "speedup_vs_plain", "speedup_vs_hf_assisted", "mean_accepted_len", "branch_reuse_rate",
          "device", "time_per_op_ms", "overlap")


def test_demo_quick_run(tmp_path, capsys):
    from loramix_kernels import demo

    threads = torch.get_num_threads()
    args = ["--quick", "--steps", "6", "--mixer-steps", "2", "--prompts", "3", "--new-tokens", "12",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "out" / "demo.json"),
            "--plot", str(tmp_path / "demo.png"), "--quiet"]
    try:
        with loramix_kernels.use_backend("auto"):
            first = demo.main(args)
            second = demo.main(args)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "lossless (Mirror-SD greedy == plain greedy, every prompt): True" in out
    report = json.loads((tmp_path / "out" / "demo.json").read_text())
    for key in FIELDS:
        assert key in report, key
    assert report["lossless"] is True and report["lossless_prompts"] == "3/3"
    assert report["lossless_no_overlap"] is True and report["lossless_no_branches"] is True
    assert report["tree_spec_no_branches_tokens_per_s"] > 0
    assert report["speedup_no_branches_vs_plain_batch1"] == pytest.approx(
        report["tree_spec_no_branches_batch1_tokens_per_s"] / report["plain_batch1_tokens_per_s"])
    assert report["speedup_vs_hf_assisted_batch1"] == pytest.approx(
        report["mirror_batch1_tokens_per_s"] / report["hf_assisted_tokens_per_s"])
    for key in ("plain_tokens_per_s", "mirror_tokens_per_s", "hf_assisted_tokens_per_s"):
        assert report[key] > 0
    assert report["speedup_vs_plain"] == pytest.approx(
        report["mirror_tokens_per_s"] / report["plain_tokens_per_s"])
    assert report["speedup_vs_hf_assisted"] == pytest.approx(
        report["mirror_tokens_per_s"] / report["hf_assisted_tokens_per_s"])
    assert 0 <= report["branch_reuse_rate"] <= 1
    assert 0 <= report["mean_accepted_len"] <= report["tree"]["chain_len"]
    assert len(report["accepted_per_step"]) == report["mirror_steps"]
    assert {"tree_attention", "verify_greedy", "compact_kv_layers_", "match_branch", "lm_head_topk",
            "kv_write_"} <= set(report["time_per_op_ms"])
    assert report["hf_assisted_matches_engine_plain"].split("/")[0] == \
        report["hf_assisted_matches_engine_plain"].split("/")[1]
    # the second run loads the cached weights instead of training
    assert first["training"]["cached"] is False and second["training"]["cached"] is True
    assert second["speedup_vs_plain"] > 0 and second["lossless"] is True
    assert os.path.isfile(first["training"]["cache_path"])
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "demo.png").stat().st_size > 1000
    except ImportError:
        assert report["plot"] is None and not (tmp_path / "demo.png").exists()


def test_demo_help():
    r = subprocess.run([sys.executable, "-m", "loramix_kernels.demo", "--help"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(loramix_kernels.__file__))))
    assert r.returncode == 0
    for opt in ("--quick", "--device", "--json", "--plot", "--cache-dir"):
        assert opt in r.stdout
