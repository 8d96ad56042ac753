"""Dense-prediction model sizes next to the paper's: Semantic FPN (Table 5: parameters with ADE20K's
150 classes, GFLOPs at 512x512) and RetinaNet (Table 3: parameters with COCO's 80 classes;
GFLOPs at 1280x800 next to Table 6's B2 and B2-Li).

  python -m pvt_jax.benchmark --dense --output_dir=/tmp/dense     # dense.json, dense.md

Parameters come from jax.eval_shape (nothing allocated); GFLOPs from XLA's cost analysis of the
forward pass's program (`benchmark.xla_flops`, nothing run), halved to count a multiply-add once
as the paper's (mmcv's) counter does. The whole report takes minutes on a CPU.
"""

import json
import math
import os

import jax

from pvt_jax.models import VARIANTS, retinanet, semantic_fpn

# Paper Table 5 (Semantic FPN on ADE20K): (#Param M, GFLOPs at 512x512).
TABLE5 = {"b0": (7.6, 25.0), "b1": (17.8, 34.2), "b2_li": (26.3, 41.0), "b2": (29.1, 45.8),
          "b3": (49.0, 62.4), "b4": (66.3, 81.3), "b5": (85.7, 91.1)}
# Paper Table 3 (RetinaNet 1x on COCO): #Param M; Table 6: GFLOPs at 1280x800.
TABLE3 = {"b0": 13.0, "b1": 23.8, "b2_li": 32.3, "b2": 35.1, "b3": 55.0, "b4": 72.3, "b5": 91.7}
TABLE6_GFLOPS = {"b2": 290.7, "b2_li": 227.4}

SEGMENTATION_CLASSES, DETECTION_CLASSES = 150, 80
SEGMENTATION_SIZE, DETECTION_SIZE = (512, 512), (1280, 800)


def semantic_fpn_row(variant: str, size=SEGMENTATION_SIZE, gflops: bool = True) -> dict:
  model = semantic_fpn.create_semantic_fpn(variant, SEGMENTATION_CLASSES)
  params, paper_gflops = TABLE5[variant]
  row = {"variant": variant, "params": semantic_fpn.num_params(model), "paper_params_m": params,
         "size": list(size), "paper_gflops": paper_gflops if tuple(size) == SEGMENTATION_SIZE
         else None, "gflops": None}
  if gflops:  # xla_gflops counts a multiply-add as two FLOPs
    row["gflops"] = semantic_fpn.xla_gflops(model, size) / 2
  return row


def retinanet_row(variant: str, size=DETECTION_SIZE, gflops: bool = True) -> dict:
  row = {"variant": variant, "params": retinanet.num_params(variant, DETECTION_CLASSES),
         "paper_params_m": TABLE3[variant], "size": list(size),
         "paper_gflops": TABLE6_GFLOPS.get(variant) if tuple(size) == DETECTION_SIZE else None,
         "gflops": None}
  if gflops:
    row["gflops"] = retinanet.forward_gflops(variant, *size, num_classes=DETECTION_CLASSES)
  return row


def report(variants=tuple(VARIANTS), segmentation_size=SEGMENTATION_SIZE,
           detection_size=DETECTION_SIZE, detection_gflops=tuple(TABLE6_GFLOPS)) -> dict:
  """Rows of both tables: parameters of every variant; GFLOPs of every Semantic FPN and of the
  RetinaNets in `detection_gflops` (by default Table 6's two)."""
  return {"semantic_fpn": [semantic_fpn_row(v, segmentation_size) for v in variants],
          "retinanet": [retinanet_row(v, detection_size, v in detection_gflops)
                        for v in variants],
          "backend": jax.default_backend()}


def _number(x, spec: str) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(title: str, rows) -> list[str]:
  lines = [title, "", "| variant | params | paper | GFLOPs (XLA) | paper |",
           "|---|---|---|---|---|"]
  for r in rows:
    size = "x".join(map(str, r["size"]))
    gflops = "-" if r["gflops"] is None else f"{_number(r['gflops'], '.1f')} at {size}"
    lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f} M | {r['paper_params_m']} M | "
                 f"{gflops} | {_number(r['paper_gflops'], '.1f')} |")
  return lines


def markdown(results: dict) -> str:
  return "\n".join(_table("Semantic FPN, 150 classes (paper Table 5)", results["semantic_fpn"])
                   + [""] + _table("RetinaNet, 80 classes (paper Table 3; GFLOPs: Table 6)",
                                   results["retinanet"])) + "\n"


def run(output_dir: str, quick: bool = False) -> dict:
  """Writes dense.json and dense.md into `output_dir` and prints the tables; `quick`: B0 only,
  at 64 px (a test of the code path, not of the paper's numbers)."""
  if quick:
    results = report(("b0",), (64, 64), (64, 96), ("b0",))
  else:
    results = report()
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "dense.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown(results)
  with open(os.path.join(output_dir, "dense.md"), "w") as f:
    f.write(table)
  print(table)
  return results
