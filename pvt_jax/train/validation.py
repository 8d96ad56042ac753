"""Config checks made before anything is opened, built or written: a config that cannot run
fails in a second with one line naming the field, not minutes in with a traceback."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from pvt_jax import tasks
from pvt_jax.models import VARIANTS, remat
from pvt_jax.train import optimizer, sharding
from pvt_jax.train.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype -> compute dtype


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def check_eval_config(config) -> tasks.Task:
  """What evaluation needs: a known task, variant and dtype, and an eval batch that splits over
  the devices. Returns the task."""
  try:
    task = tasks.get_task(config.task)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _require(config.variant in VARIANTS,
           f"unknown variant {config.variant!r}; choose from {', '.join(VARIANTS)}")
  _require(config.dtype in DTYPES, f"dtype={config.dtype!r} is not one of {', '.join(DTYPES)}")
  _require(config.num_classes >= 0, f"num_classes={config.num_classes} must be >= 0")
  _require(config.eval_batch_size >= 0,
           f"eval_batch_size={config.eval_batch_size} must be positive (or 0: batch_size)")
  sharding.check_batch_size(config.eval_batch_size or config.batch_size, "eval_batch_size")
  sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  return task


def _check_optimizer(config) -> None:
  opt = config.optimizer
  _require(opt.schedule in optimizer.SCHEDULE_FIELDS,
           f"optimizer.schedule={opt.schedule!r} is not one of "
           f"{', '.join(optimizer.SCHEDULE_FIELDS)}")
  missing = [f for f in optimizer.SCHEDULE_FIELDS[opt.schedule] if f not in opt]
  _require(not missing, f"optimizer.schedule={opt.schedule!r} needs optimizer."
                        f"{', optimizer.'.join(missing)}")
  _require(opt.base_lr > 0, f"optimizer.base_lr={opt.base_lr} must be positive")
  _require(opt.lr_batch_base > 0, f"optimizer.lr_batch_base={opt.lr_batch_base} must be positive")
  peak = optimizer.scaled_learning_rate(config)
  with np.errstate(over="ignore"):
    _require(math.isfinite(np.float32(peak)),
             f"optimizer.base_lr={opt.base_lr} gives a learning rate of {peak:g}, which float32 "
             f"cannot hold")
  for field in ("warmup_lr", "min_lr", "weight_decay", "grad_clip_norm"):
    if field in opt:
      _require(opt[field] >= 0, f"optimizer.{field}={opt[field]} must be >= 0")
  _require(0 <= opt.b1 < 1 and 0 <= opt.b2 < 1,
           f"optimizer.b1={opt.b1} and b2={opt.b2} must be in [0, 1)")
  _require(opt.eps > 0, f"optimizer.eps={opt.eps} must be positive")


def check_config(config) -> tasks.Task:
  """Everything a training run's config must satisfy, shared fields and the task's own
  (`Task.check_config`), without opening the dataset. Returns the task."""
  sharding.check_batch_size(config.batch_size)
  task = check_eval_config(config)
  accum = config.grad_accum_steps
  _require(accum >= 1 and config.batch_size % (accum * jax.device_count()) == 0,
           f"batch_size={config.batch_size} does not split into grad_accum_steps={accum} "
           f"micro-batches over {jax.device_count()} devices")
  _require(config.num_train_steps > 0 or config.num_epochs > 0,
           "nothing to train: set num_epochs or num_train_steps > 0")
  _check_optimizer(config)
  _require(config.remat_policy in remat.NAMES,
           f"remat_policy={config.remat_policy!r} is not one of {', '.join(remat.NAMES)}")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(config[field] >= 1, f"{field}={config[field]} must be at least 1")
  _require(config.eval_every_steps >= 0,
           f"eval_every_steps={config.eval_every_steps} must be >= 0 (0: once per epoch)")
  profile = tuple(config.profile_steps)
  _require(len(profile) == 2 and all(isinstance(v, int) and v >= 0 for v in profile),
           f"profile_steps={profile} must be (first step, number of steps), both >= 0")
  if config.init_from is None:
    raise ConfigError("this config fine-tunes a converted checkpoint: set "
                      "--config.init_from=DIR (made by python -m pvt_jax.convert)")
  if config.init_from:
    _require(os.path.exists(config.init_from), f"init_from {config.init_from} does not exist")
    _require(os.path.isdir(config.init_from),
             f"init_from {config.init_from} is a file; it takes a converted checkpoint "
             f"directory (python -m pvt_jax.convert --input={config.init_from} --output=DIR)")
  task.check_config(config)
  return task
