"""The optimizer: AdamW with a per-step learning-rate schedule chosen by config.optimizer.schedule.

Schedules (each reads the fields listed in SCHEDULE_FIELDS from config.optimizer; the peak rate
is `scaled_learning_rate`):
  warmup_cosine  classification (DeiT / PVT v2): linear warmup from warmup_lr over warmup_epochs,
                 then cosine down to min_lr at the last step.
  poly           segmentation (mmseg 'poly'): (peak - min_lr) * (1 - step / steps) ** poly_power
                 + min_lr, held at min_lr after the last step.
  step           detection (mmdet 2.x 'step' with linear warmup): x decay_rate at the start of
                 each epoch in decay_epochs, times a linear warmup from warmup_ratio of the rate
                 at step 0 to all of it at step warmup_steps.
"""

import jax
import jax.numpy as jnp
import optax

SCHEDULE_FIELDS = {
    "warmup_cosine": ("warmup_lr", "warmup_epochs", "min_lr"),
    "poly": ("poly_power", "min_lr"),
    "step": ("warmup_steps", "warmup_ratio", "decay_epochs", "decay_rate"),
}


def scaled_learning_rate(config) -> float:
  """Linear scaling rule: base_lr x global batch / lr_batch_base (512 in the official recipe)."""
  return config.optimizer.base_lr * config.batch_size / config.optimizer.lr_batch_base


def _warmup_cosine(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  opt = config.optimizer
  warmup_steps = min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=opt.warmup_lr, peak_value=scaled_learning_rate(config),
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
      end_value=opt.min_lr)


def _poly(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  del steps_per_epoch
  opt = config.optimizer
  return optax.polynomial_schedule(init_value=scaled_learning_rate(config), end_value=opt.min_lr,
                                   power=opt.poly_power, transition_steps=total_steps)


def _step(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  del total_steps
  opt = config.optimizer
  peak = scaled_learning_rate(config)
  boundaries = jnp.asarray([int(e * steps_per_epoch) for e in opt.decay_epochs], jnp.int32)

  def schedule(step):
    decays = jnp.sum(jnp.asarray(step) >= boundaries)
    warm = jnp.minimum(jnp.asarray(step, jnp.float32) / max(opt.warmup_steps, 1), 1.0)
    return peak * opt.decay_rate ** decays * (opt.warmup_ratio + (1 - opt.warmup_ratio) * warm)

  return schedule


_SCHEDULES = {"warmup_cosine": _warmup_cosine, "poly": _poly, "step": _step}


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The per-step schedule named by config.optimizer.schedule (module docstring)."""
  return _SCHEDULES[config.optimizer.schedule](config, steps_per_epoch, total_steps)


def weight_decay_mask(params):
  """Decay matrices and conv kernels only; biases and norm parameters (all 1-D) are exempt."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (betas .9/.999, eps 1e-8, wd .05 by default), optionally after grad-norm clipping;
  decay on every parameter with optimizer.decay_all_params (mmseg/mmdet's AdamW), else on
  matrices and kernels only (the official classification recipe)."""
  opt = config.optimizer
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay,
                      mask=None if opt.decay_all_params else weight_decay_mask)
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw
