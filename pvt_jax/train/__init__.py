"""Training: mesh and shardings, optimizer, jitted steps, checkpoints, metrics and the loop."""

from pvt_jax.train.errors import ConfigError, NonFiniteLossError
from pvt_jax.train.loop import evaluate, train_and_evaluate

__all__ = ["ConfigError", "NonFiniteLossError", "evaluate", "train_and_evaluate"]
