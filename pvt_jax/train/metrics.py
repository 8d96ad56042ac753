"""Where training metrics go: TensorBoard, a JSON-lines log and, at the end, a PNG plot."""

import json
import math
import os

import tensorboardX

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


class MetricsWriter:
  """Writes scalars to TensorBoard event files and appends them to `<workdir>/metrics.jsonl`.

  Only the main process writes (`enabled=False` elsewhere); resumed runs append.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, METRICS_FILE)
    if enabled:
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(self.jsonl_path, "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()
      self._jsonl.close()


def read_metrics(jsonl_path: str) -> list[dict]:
  with open(jsonl_path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl_path: str, png_path: str) -> None:
  """Loss (train and eval) and eval accuracy against step, side by side."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(jsonl_path)

  def series(name):
    points = [(r["step"], r[name]) for r in records if name in r and math.isfinite(r[name])]
    return [p[0] for p in points], [p[1] for p in points]

  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
  for name in ("train/loss", "eval/loss"):
    loss_ax.plot(*series(name), label=name, marker="." if name.startswith("eval") else None)
  loss_ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
  for name in ("eval/top1", "eval/top5"):
    acc_ax.plot(*series(name), label=name, marker=".")
  acc_ax.set(xlabel="step", ylabel="accuracy", title="eval accuracy", ylim=(0, 1))
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
