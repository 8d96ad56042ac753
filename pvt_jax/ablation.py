"""The PVT v2 paper's ablation, rerun from the model's switches: Table 6 and Figure 4.

Table 6: per row (PVT v1-Small, + OPE, ++ CFFN = B2, +++ LSRA = B2-Li; configs/ablation.py) the
classification parameters and GMACs at 224x224, and RetinaNet's (80 classes) parameters and
GFLOPs at 1280x800, next to the paper's. Figure 4: GFLOPs of the classifier's compiled forward
against the input scale for PVT v1-Small, B2 and B2-Li, with each curve's growth.

  python -m pvt_jax.ablation [--output_dir=benchmarks/ablation] [--sizes=224,448,...]
      [--nodetection]

GFLOPs are XLA's cost analysis of the forward (`benchmark.xla_flops`: the plain XLA ops GPUs
and TPUs run, as lowered) halved, i.e. multiply-adds, the unit of the paper's "GFLOPs" (mmcv's
counter). Writes ablation.json, ablation.md and figure4.png into --output_dir.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from pvt_jax.benchmark import xla_flops
from pvt_jax.models import VARIANTS, create_model, model_name, retinanet

# Table 6 of the PVT v2 paper: (row, variant, ImageNet top-1, RetinaNet #P (M), GFLOPs).
TABLE6 = (("PVT v1-Small", "v1_small", 79.8, 34.2, 285.8),
          ("+ OPE", "v1_small_ope", 81.1, 34.9, 288.6),
          ("++ CFFN (B2)", "b2", 82.0, 35.1, 290.7),
          ("+++ LSRA (B2-Li)", "b2_li", 82.1, 32.3, 227.4))
FIGURE4_VARIANTS = ("v1_small", "b2", "b2_li")
FIGURE4_SIZES = (224, 448, 672, 1024)


def forward_gmacs(variant: str, height: int = 224, width: int = 224) -> float:
  """Multiply-adds (G) of the classifier's compiled forward on one image."""
  model = create_model(variant)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]

  def forward(p, x):
    return model.apply({"params": p}, x)

  return xla_flops(forward, params, images) / 2 / 1e9


def num_params(variant: str) -> int:
  shapes = jax.eval_shape(create_model(variant).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def table6(detection: bool = True) -> list[dict]:
  rows = []
  for row, variant, top1, paper_params, paper_gflops in TABLE6:
    result = {"row": row, "variant": variant, "paper_top1": top1,
              "params_m": num_params(variant) / 1e6, "gmacs_224": forward_gmacs(variant),
              "paper_gmacs_224": VARIANTS[variant].official.gmacs,
              "retinanet_params_m": retinanet.num_params(variant) / 1e6,
              "paper_retinanet_params_m": paper_params, "paper_retinanet_gflops": paper_gflops}
    if detection:
      result["retinanet_gflops"] = retinanet.forward_gflops(variant)
    rows.append(result)
  return rows


def growth(gmacs: dict[int, float]) -> dict:
  """How a curve grows: GMACs at the largest size over those at 224, and the log-log slope over
  the last two sizes (2: linear in the pixels; 4: quadratic, as global attention)."""
  sizes = sorted(gmacs)
  a, b = sizes[-2], sizes[-1]
  return {"ratio": gmacs[b] / gmacs[sizes[0]],
          "slope": math.log(gmacs[b] / gmacs[a]) / math.log(b / a)}


def figure4(sizes=FIGURE4_SIZES, variants=FIGURE4_VARIANTS) -> dict:
  curves = {v: {s: forward_gmacs(v, s, s) for s in sizes} for v in variants}
  return {v: {"gmacs": {str(s): g for s, g in c.items()}, "growth": growth(c)}
          for v, c in curves.items()}


def _number(x, digits=1):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(rows: list[dict], curves: dict) -> str:
  lines = ["| Table 6 row | top-1 (paper) | #P M | GMACs 224 (paper) | RetinaNet #P M (paper) "
           "| RetinaNet GFLOPs 1280x800 (paper) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['row']} | {r['paper_top1']} | {r['params_m']:.2f} "
                 f"| {r['gmacs_224']:.2f} ({_number(r['paper_gmacs_224'], 2)}) "
                 f"| {r['retinanet_params_m']:.1f} ({r['paper_retinanet_params_m']}) "
                 f"| {_number(r.get('retinanet_gflops'))} ({r['paper_retinanet_gflops']}) |")
  if curves:
    sizes = list(next(iter(curves.values()))["gmacs"])
    lines += ["", "| GFLOPs (G multiply-adds) | " + " | ".join(sizes) + " | x vs 224 | slope |",
              "|---|" + "---|" * (len(sizes) + 2)]
    for v, c in curves.items():
      lines.append(f"| {model_name(v)} | " + " | ".join(f"{c['gmacs'][s]:.1f}" for s in sizes)
                   + f" | {c['growth']['ratio']:.1f} | {c['growth']['slope']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(curves: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 4))
  for v, c in curves.items():
    sizes = [int(s) for s in c["gmacs"]]
    ax.plot(sizes, list(c["gmacs"].values()), marker="o", label=model_name(v))
  ax.set(xlabel="input scale (px, square)", ylabel="GFLOPs (G multiply-adds)",
         title="PVT v2 paper, Figure 4 (XLA cost analysis)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags() -> None:
  """Defined on demand, so importing this module never clashes with other CLIs' flags."""
  flags.DEFINE_string("output_dir", "benchmarks/ablation", "Where the results go.")
  flags.DEFINE_list("sizes", [str(s) for s in FIGURE4_SIZES], "Figure 4's input scales (px); "
                    "empty: no Figure 4.")
  flags.DEFINE_bool("detection", True, "Count RetinaNet's GFLOPs at 1280x800 (minutes on a CPU).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fv = flags.FLAGS
  rows = table6(fv.detection)
  curves = figure4([int(s) for s in fv.sizes]) if fv.sizes else {}
  os.makedirs(fv.output_dir, exist_ok=True)
  with open(os.path.join(fv.output_dir, "ablation.json"), "w") as f:
    json.dump({"table6": rows, "figure4": curves}, f, indent=1)
  text = markdown(rows, curves)
  with open(os.path.join(fv.output_dir, "ablation.md"), "w") as f:
    f.write(text)
  if curves:
    plot(curves, os.path.join(fv.output_dir, "figure4.png"))
  print(text, end="")


if __name__ == "__main__":
  define_flags()
  app.run(main)
