"""The official runs' detection learning-rate schedule (mmdet 2.x, mmcv's `LrUpdaterHook`):
linear warmup from `warmup_ratio` of the rate at step 0 to all of it at step `warmup_steps`
(multiplying the rest of the schedule; mmdet 3.x's `LinearLR(end=warmup_steps)` arrives one step
earlier), and x `decay_rate` at the start of each epoch in `decay_epochs` (`step=[8, 11]`)."""

import jax.numpy as jnp
import optax


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Per-step rate of config.optimizer (schedule "step"): base_lr x batch_size / lr_batch_base."""
  opt = config.optimizer
  peak = opt.base_lr * config.batch_size / opt.lr_batch_base
  boundaries = jnp.asarray([e * steps_per_epoch for e in opt.decay_epochs], jnp.int32)

  def schedule(step):
    decays = (jnp.asarray(step) >= boundaries).sum()
    warm = jnp.minimum(jnp.asarray(step, jnp.float32) / max(opt.warmup_steps, 1), 1.0)
    return peak * opt.decay_rate ** decays * (opt.warmup_ratio + (1 - opt.warmup_ratio) * warm)

  return schedule
