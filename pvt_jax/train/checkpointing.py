"""Training checkpoints: orbax CheckpointManager with async saves, last-K plus best-top-1 kept."""

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_SUBDIR = "checkpoints"


def _top1(metrics) -> float:
  return metrics["top1"]


class TrainCheckpoints:
  """The checkpoints of one workdir (`<workdir>/checkpoints/<step>`).

  Saves are asynchronous; checkpoints saved with eval metrics compete for "best by top-1", which
  is kept on top of the latest `keep` ones.
  """

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_top1, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_top1, best_mode="max", create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=not read_only)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, metrics: dict | None = None) -> None:
    """Starts an async save of `state` (an eval result in `metrics` ranks it for "best")."""
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Restores onto the shardings of `abstract_state`, whatever mesh the checkpoint came from."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def reached_preemption(self, step: int) -> bool:
    """Multi-process preemption notice, agreed on by every process at the same step."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for `TrainCheckpoints.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
