"""Console output of a training run, on the main process only: messages, and the progress.

On a terminal the progress is tqdm's live bar; when stderr is not one (a log file, a batch job,
a notebook reading the output) a bar's carriage returns make a log unreadable, so the progress
is one plain line per log step instead.
"""

import sys
import time

import jax
import tqdm
from absl import logging


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
