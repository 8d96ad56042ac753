"""Tasks the trainer serves, by `config.task`; see base.py for what a task supplies.

  task = get_task(config.task)   # a Task: data, model, loss, evaluation

A new task: a module here with a `Task` subclass (name, best_metric and the methods of base.py),
its entry in TASKS, and a config module in pvt_jax/configs/ building on `base.base_config` with
`c.task` set (its `get_config` is the task's `default_config`). `python -m pvt_jax.main` and
`python -m pvt_jax.evaluate` then serve it without further changes.
"""

import importlib

from pvt_jax.tasks.base import DatasetInfo, EvalAccumulator, SumAccumulator, Task

# config.task -> "module:class", imported on first use (a task's modules are loaded only when it
# runs).
TASKS = {
    "classification": "pvt_jax.tasks.classification:ClassificationTask",
    "segmentation": "pvt_jax.tasks.segmentation:SegmentationTask",
    "detection": "pvt_jax.tasks.detection:DetectionTask",
}


def get_task(name: str) -> Task:
  """The task named `name`; ValueError naming the known ones otherwise."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)()


__all__ = ["TASKS", "DatasetInfo", "EvalAccumulator", "SumAccumulator", "Task", "get_task"]
