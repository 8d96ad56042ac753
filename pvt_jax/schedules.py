"""Learning-rate schedules beyond the classification recipe's warmup + cosine."""

import optax


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9,
                  min_lr: float = 0.0) -> optax.Schedule:
  """mmseg's 'poly' policy per iteration: (base_lr - min_lr) * (1 - step / total) ** power
  + min_lr, held at min_lr after `total_steps` (the Semantic FPN recipe: power 0.9)."""
  return optax.polynomial_schedule(init_value=base_lr, end_value=min_lr, power=power,
                                   transition_steps=total_steps)
