"""Training checkpoints: orbax CheckpointManager with async saves, last-K plus the best kept.

Failures of a save (a full disk, a workdir that became read-only) are raised as one-line
CheckpointErrors naming the step whose save failed, as soon as the background write reports
them (`poll`, called every step), not at the next save.
"""

import contextlib
import logging as std_logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from pvt_jax.checkpoints.errors import CheckpointError

CHECKPOINT_SUBDIR = "checkpoints"


class SaveError(CheckpointError):
  """A checkpoint could not be written; its background writes are abandoned, unfinished."""

# orbax log lines that are expected here, not news: checkpoints between evaluations carry no
# metrics by design, evaluation opens the manager read-only on purpose, and a stop at a
# preemption sync point is reported by the loop.
_EXPECTED = ("Requested `tracked_metric`; did not provide metrics.", "Given directory is read only",
             "Reached preemption sync point")


class _Expected(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return not any(text in str(record.msg) for text in _EXPECTED)


def orbax_errors_reported_by_us(record: std_logging.LogRecord) -> bool:
  """A log filter for the CLIs: orbax logs a failed save (with tracebacks, from each of its
  threads) before raising it, and TrainCheckpoints raises every such failure as one line."""
  return not ("/orbax/" in record.pathname and record.levelno >= std_logging.ERROR)


std_logging.getLogger("absl").addFilter(_Expected())


def _reason(error: BaseException) -> str:
  """The OS's words for a failed write (e.g. "No space left on device"), else the first line."""
  while error is not None:
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    text = str(error)
    for words in ("No space left on device", "File too large", "Read-only file system",
                  "Permission denied", "Disk quota exceeded"):
      if words in text:
        return words
    error = error.__cause__ or error.__context__
  return "write failed"


class TrainCheckpoints:
  """The checkpoints of one workdir (`<workdir>/checkpoints/<step>`).

  Saves are asynchronous; checkpoints saved with eval metrics compete for "best" by
  `best_metric` (higher is better), which is kept on top of the latest `keep` ones.
  """

  def __init__(self, workdir: str, best_metric: str = "top1", keep: int = 3,
               read_only: bool = False):
    def metric(metrics) -> float:
      return metrics[best_metric]

    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=metric, best_mode="max", create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=not read_only)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    self.best_metric = best_metric
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving = None  # step of the save in flight
    self._failed = False  # a failed save was raised already

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    """The eval metrics a checkpoint was saved with (None for one saved between evals)."""
    return self._manager.metrics(step)

  @contextlib.contextmanager
  def _failures_named(self, step: int):
    try:
      yield
    except CheckpointError:
      raise
    except Exception as error:  # orbax and tensorstore raise many types for a failed write
      self._saving, self._failed = None, True
      raise SaveError(f"saving the checkpoint of step {step} failed ({_reason(error)})",
                      self.directory) from None

  def save(self, step: int, state, metrics: dict | None = None) -> None:
    """Starts an async save of `state` (an eval result in `metrics` ranks it for "best")."""
    self.wait()  # a failure of the previous save is about that save, not this one
    with self._failures_named(step):
      self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
    self._saving = step

  def poll(self) -> None:
    """Once the save in flight has finished in the background, raises its failure if it
    failed (never blocks)."""
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def restore(self, abstract_state, step: int | None = None):
    """Restores onto the shardings of `abstract_state`, whatever mesh the checkpoint came from."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_part(self, abstract_part: dict, step: int) -> dict:
    """Restores only the top-level entries of `abstract_part` (e.g. 'params' and 'batch_stats',
    without the optimizer state), onto its shardings."""
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                abstract_part)
    return self._manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract_part, restore_args=restore_args, partial_restore=True))

  def reached_preemption(self, step: int) -> bool:
    """Multi-process preemption notice, agreed on by every process at the same step."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises its failure."""
    if self._saving is not None:
      with self._failures_named(self._saving):
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
      self._saving = None

  def close(self) -> None:
    """Finishes the save in flight. After a failed save (raised already) the manager is left as
    it is: closing it would wait on the failed writes, which only report their failure again."""
    if self._failed:
      return
    self.wait()
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for `TrainCheckpoints.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
