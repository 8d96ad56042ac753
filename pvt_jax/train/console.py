"""Console output of a training run, on the main process only: messages, the summaries at start
and end, and the progress.

On a terminal the progress is tqdm's live bar; when stderr is not one (a log file, a batch job,
a notebook reading the output) a bar's carriage returns make a log unreadable, so the progress
is one plain line per log step instead.
"""

import math
import sys
import time

import jax
import tqdm
from absl import logging

from pvt_jax.train import metrics, optimizer


def report(message: str) -> None:
  """A message on the console of the main process (beside the progress bar) and in the log."""
  logging.info(message)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Steps done out of `total` (from `initial` on); `enabled` False shows nothing."""

  def __init__(self, total: int, initial: int, enabled: bool):
    enabled = enabled and jax.process_index() == 0
    self.live = enabled and sys.stderr.isatty()
    self.lines = enabled and not self.live
    self.total, self.initial = total, initial
    self._start = time.perf_counter()
    self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                          disable=not self.live)

  def update(self) -> None:
    self._bar.update()

  def log(self, step: int, fields: dict) -> None:
    """The latest log record's values (name -> formatted value)."""
    if self.live:
      self._bar.set_postfix(fields)
    elif self.lines:
      elapsed = time.perf_counter() - self._start
      left = elapsed / max(step - self.initial, 1) * (self.total - step)
      values = ", ".join(f"{name} {value}" for name, value in fields.items())
      report(f"step {step}/{self.total}: {values} ({_duration(elapsed)} elapsed, "
             f"{_duration(left)} left)")

  def close(self) -> None:
    self._bar.close()


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def fraction(x: float) -> str:
  """0.034 -> "3.4%", 0.34 -> "34%"."""
  return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def _classes(info, limit: int = 12) -> str:
  """"T-shirt/top, Trouser, ..." (with train/eval counts for folders), at most `limit` names."""
  names = list(info.class_names) or [str(k) for k in range(info.num_classes)]
  if info.train_class_counts:
    eval_counts = info.eval_class_counts or ("?",) * len(names)
    names = [f"{n} {a}/{b}" for n, a, b in zip(names, info.train_class_counts, eval_counts,
                                               strict=True)]
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def start_summary(config, setup, workdir_path: str, start: int) -> None:
  """The block a user looks for at start: task, data, devices and mesh, steps, where to
  (`setup`: loop.Setup)."""
  info, mesh = setup.info, setup.mesh
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
  per_device = config.batch_size // jax.device_count()
  accum = f", {config.grad_accum_steps} micro-batches" if config.grad_accum_steps > 1 else ""
  epochs = setup.total_steps / info.steps_per_epoch
  counts = " with train/eval images per class" if info.train_class_counts else ""
  lines = [
      f"task      {setup.task.name}: PVT v2-{config.variant}, {params / 1e6:.2f} M parameters, "
      f"{setup.num_classes} classes",
      f"dataset   {info.name}: {info.train_split} {info.num_train_examples} / {info.eval_split} "
      f"{info.num_eval_examples} examples",
      f"classes   {_classes(info)}{counts}",
      f"devices   {_count(jax.device_count(), jax.devices()[0].platform + ' device')} in "
      f"{_count(jax.process_count(), 'process')}; mesh data {mesh.shape['data']} x fsdp "
      f"{mesh.shape['fsdp']}",
      f"training  {setup.total_steps} steps of {config.batch_size} ({per_device} per device"
      f"{accum}): {epochs:.3g} epochs of {info.steps_per_epoch} steps; "
      f"{config.optimizer.schedule} schedule, peak lr {optimizer.scaled_learning_rate(config):g}",
      f"workdir   {workdir_path}: " + (f"resuming from step {start}" if start else
                                       "no checkpoint, starting from scratch"),
  ]
  report("\n".join(lines))
  if config.batch_size > info.num_train_examples:
    report(f"warning: batch_size={config.batch_size} is larger than the training split "
           f"({info.num_train_examples} examples): every step repeats examples")


def end_summary(ckpts, best_metric: str, workdir_path: str, step: int) -> None:
  """Where the outputs went, and which checkpoint is the best."""
  best = ckpts.best_step()
  best_text = ""
  if best is not None:
    best_text = f"; best: step {best} ({best_metric} {ckpts.metrics(best)[best_metric]:.4f})"
  saved = ", ".join(str(s) for s in sorted(ckpts.all_steps())) or "none"
  report(f"step {step}: outputs in {workdir_path}: checkpoints/ (steps {saved}{best_text}), "
         f"{metrics.METRICS_FILE}, {metrics.PLOT_FILE}, {metrics.TENSORBOARD_SUBDIR}/")
