"""Training for every task: checks, mesh and shardings, optimizer, jitted steps, checkpoints,
metrics and the loop (tasks themselves: pvt_jax/tasks)."""

from pvt_jax.train.errors import ConfigError, NonFiniteLossError
from pvt_jax.train.loop import evaluation_pass, train_and_evaluate

__all__ = ["ConfigError", "NonFiniteLossError", "evaluation_pass", "train_and_evaluate"]
