"""The official PVT v2 (DeiT) optimizer: AdamW with a warmup + cosine schedule per step."""

import jax
import optax


def scaled_learning_rate(config) -> float:
  """Linear scaling rule of the official recipe: base_lr x global_batch / 512."""
  return config.optimizer.base_lr * config.batch_size / config.optimizer.lr_batch_base


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from warmup_lr, then cosine down to min_lr at `total_steps`."""
  opt = config.optimizer
  warmup_steps = min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=opt.warmup_lr, peak_value=scaled_learning_rate(config),
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
      end_value=opt.min_lr)


def weight_decay_mask(params):
  """Decay matrices and conv kernels only; biases and norm parameters (all 1-D) are exempt."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (betas .9/.999, eps 1e-8, wd .05 by default), optionally after grad-norm clipping."""
  opt = config.optimizer
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=weight_decay_mask)
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw
