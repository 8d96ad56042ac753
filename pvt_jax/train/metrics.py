"""Where training metrics go: TensorBoard, a JSON-lines log and, at the end, a PNG plot.

TensorBoard events are written with tensorboardX, not clu's metric_writers: clu writes through
TensorFlow's summary ops and needs the `tensorboard` package besides, while tensorboardX writes
the same event files with neither (the input pipeline's tensorflow-cpu stays a data dependency).
"""

import json
import math
import numbers
import os

import tensorboardX
from flax import traverse_util

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TENSORBOARD_SUBDIR = "tensorboard"


def flatten(scalars: dict) -> dict:
  """{'eval/iou': {'wall': .7}} -> {'eval/iou/wall': .7}: nested metrics as flat names."""
  return traverse_util.flatten_dict(scalars, sep="/")


def read_metrics(jsonl_path: str) -> list[dict]:
  with open(jsonl_path) as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_after(jsonl_path: str, step: int) -> int:
  """Removes the records after `step` (written before a crash, from steps a resumed run does
  again), so that each step is logged once; returns how many there were. A partly written
  last line (a kill mid-write) goes too."""
  if not os.path.isfile(jsonl_path):
    return 0
  kept, dropped = [], 0
  with open(jsonl_path) as f:
    for line in f:
      try:
        record = json.loads(line) if line.endswith("\n") else None
      except ValueError:
        record = None
      if record is not None and record.get("step", 0) <= step:
        kept.append(line)
      elif line.strip():
        dropped += 1
  if dropped:
    partial = f"{jsonl_path}.partial"
    with open(partial, "w") as f:
      f.writelines(kept)
    os.replace(partial, jsonl_path)
  return dropped


class MetricsWriter:
  """Writes scalars to TensorBoard event files and appends them to `<workdir>/metrics.jsonl`.

  Only the main process writes (`enabled=False` elsewhere). A run resumed at `start_step` first
  drops the JSON records after it and has TensorBoard hide the events after it (tensorboardX's
  purge_step), since the resumed run logs those steps again.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, METRICS_FILE)
    self.dropped = 0
    if enabled:
      self.dropped = drop_after(self.jsonl_path, start_step)
      self._tensorboard = tensorboardX.SummaryWriter(
          os.path.join(workdir, TENSORBOARD_SUBDIR), purge_step=start_step + 1)
      self._jsonl = open(self.jsonl_path, "a")

  def write(self, step: int, scalars: dict) -> None:
    """Nested dicts are flattened; numbers go to TensorBoard too, everything to the JSON log."""
    if not self.enabled:
      return
    scalars = flatten(scalars)
    for name, value in scalars.items():
      if isinstance(value, numbers.Real):
        self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()
      self._jsonl.close()


def plot_metrics(jsonl_path: str, png_path: str, eval_metrics=("top1", "top5")) -> None:
  """Loss (train and eval) and the eval metrics `eval_metrics` (fractions) against step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(jsonl_path)

  def series(name):
    points = [(r["step"], r[name]) for r in records
              if isinstance(r.get(name), numbers.Real) and math.isfinite(r[name])]
    return [p[0] for p in points], [p[1] for p in points]

  fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
  for name in ("train/loss", "eval/loss"):
    loss_ax.plot(*series(name), label=name, marker="." if name.startswith("eval") else None)
  loss_ax.set(xlabel="step", ylabel="loss", title="loss")
  for name in eval_metrics:
    metric_ax.plot(*series(f"eval/{name}"), label=f"eval/{name}", marker=".")
  metric_ax.set(xlabel="step", ylabel="fraction", title="evaluation", ylim=(0, 1))
  for ax in (loss_ax, metric_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
