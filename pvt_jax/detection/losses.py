"""RetinaNet's losses as mmdet computes them: sigmoid focal loss (gamma 2, alpha 0.25) over every
class of every anchor with a classification weight, L1 on the DeltaXYWH targets of positives, both
summed and divided by the same average factor, the sum over images of max(positives, 1).

mmdet computes that factor per GPU and DDP averages the GPUs' gradients, so the official loss is
the mean over groups of `images_per_group` images (2 per GPU in the official 8 x 2 setup) of each
group's sums over its factor. Grouping by a fixed image count keeps the loss independent of how
many devices or hosts share the batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

_EPS = float(np.finfo(np.float32).eps)  # mmdet's weight_reduce_loss adds it to the factor


def focal_loss(logits, labels, label_weights, gamma: float = 2.0, alpha: float = 0.25):
  """Per-image sum of sigmoid focal losses. logits [B, A, C]; labels [B, A] in 0..C (C =
  background: all-zero targets); label_weights [B, A]."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)  # C -> zeros
  loss = optax.sigmoid_focal_loss(logits.astype(jnp.float32), targets, alpha=alpha, gamma=gamma)
  return (loss * label_weights[..., None]).sum((1, 2))


def l1_loss(deltas, targets, weights):
  """Per-image sum of |deltas - targets| of positives: deltas, targets [B, A, 4], weights [B, A]."""
  return (jnp.abs(deltas.astype(jnp.float32) - targets) * weights[..., None]).sum((1, 2))


def normalise(per_image_sums, num_pos, images_per_group: int | None = None):
  """Mean over groups of consecutive images of (sum of the group's losses) / (sum of its
  max(num_pos, 1) + eps); one group of the whole batch when `images_per_group` is None."""
  batch = per_image_sums.shape[0]
  group = batch if images_per_group is None else images_per_group
  if batch % group:
    raise ValueError(f"batch of {batch} images does not split into groups of {group}")
  factor = jnp.maximum(num_pos, 1).astype(jnp.float32).reshape(-1, group).sum(1)
  return (per_image_sums.reshape(-1, group).sum(1) / (factor + _EPS)).mean()


def retinanet_loss(cls_logits, box_deltas, targets: dict, images_per_group: int | None = None,
                   gamma: float = 2.0, alpha: float = 0.25) -> tuple:
  """(loss, {'loss_cls', 'loss_box', 'num_pos'}) from the flattened head outputs [B, A, C] and
  [B, A, 4] and `targets` (batched `anchor_targets`)."""
  cls = normalise(focal_loss(cls_logits, targets["labels"], targets["label_weights"], gamma,
                             alpha), targets["num_pos"], images_per_group)
  box = normalise(l1_loss(box_deltas, targets["box_targets"], targets["box_weights"]),
                  targets["num_pos"], images_per_group)
  return cls + box, {"loss_cls": cls, "loss_box": box,
                     "num_pos": targets["num_pos"].sum().astype(jnp.float32)}
