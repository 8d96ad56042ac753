"""`python -m pvt_jax.benchmark --dense`: Semantic FPN and RetinaNet parameters next to the paper's
Tables 5 and 3 (every variant, from shapes alone), and XLA GFLOPs (B0 at 64 px here)."""

import json
import os
import subprocess
import sys

import pytest

from pvt_jax import dense_report
from pvt_jax.models import V2_VARIANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(V2_VARIANTS))
def test_parameters_match_tables_3_and_5(variant):
  segmentation = dense_report.semantic_fpn_row(variant, gflops=False)
  detection = dense_report.retinanet_row(variant, gflops=False)
  assert abs(segmentation["params"] / 1e6 - dense_report.TABLE5[variant][0]) <= 0.1
  assert abs(detection["params"] / 1e6 - dense_report.TABLE3[variant]) <= 0.1


@pytest.mark.slow
def test_dense_flag_writes_both_tables(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "pvt_jax.benchmark", "--dense", "--quick",
                         f"--output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "dense.json") as f:
    results = json.load(f)
  (segmentation,), (detection,) = results["semantic_fpn"], results["retinanet"]
  assert segmentation["size"] == [64, 64] and detection["size"] == [64, 96]
  # The FPN and head dominate at this size: a few GFLOPs, the detector's 256-channel head more.
  assert 0 < segmentation["gflops"] < detection["gflops"] < 20
  assert segmentation["paper_gflops"] is None and detection["paper_gflops"] is None  # not 512
  table = (tmp_path / "dense.md").read_text()
  assert table in proc.stdout
  assert f"| b0 | {segmentation['params'] / 1e6:.2f} M | 7.6 M |" in table
