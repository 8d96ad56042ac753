"""What mmdet's `AnchorHead` does around the convs, for batches with static shapes: anchors and
valid flags from the head's feature-map sizes, training targets and the loss, and detections.

Batches carry `image_size` int [B, 2], the (h, w) of each resized image on its zero-padded canvas
(mmdet's `img_shape`); its padded region is that size rounded up to `size_divisor` (mmdet's
`pad_shape`), and anchors beyond it are invalid, as for mmdet's per-image padding. Training
batches also carry `boxes` [B, G, 4] (resized-image pixels), `labels` [B, G] (0..C-1) and
`box_mask` [B, G] for the G padded ground-truth rows.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pvt_jax.detection.anchors import AnchorGenerator
from pvt_jax.detection.inference import InferenceSettings, detect
from pvt_jax.detection.losses import retinanet_loss
from pvt_jax.detection.targets import MaxIoUAssigner, anchor_targets


@dataclasses.dataclass(frozen=True)
class RetinaNetSettings:
  """The official config's anchor, assigner, coder, loss and test settings."""
  anchor_generator: AnchorGenerator = AnchorGenerator()
  assigner: MaxIoUAssigner = MaxIoUAssigner()
  target_means: tuple = (0.0, 0.0, 0.0, 0.0)
  target_stds: tuple = (1.0, 1.0, 1.0, 1.0)
  focal_gamma: float = 2.0
  focal_alpha: float = 0.25
  size_divisor: int = 32
  images_per_group: int | None = None  # loss normaliser groups (see losses.normalise)
  inference: InferenceSettings = InferenceSettings()

  @classmethod
  def from_config(cls, config) -> "RetinaNetSettings":
    """The settings a detection config (pvt_jax/configs/detection.py) chooses."""
    d = config.detection
    return cls(size_divisor=config.size_divisor, images_per_group=d.images_per_group or None,
               inference=InferenceSettings(d.nms_pre, d.score_thr, d.iou_threshold,
                                           d.max_per_img))


def flatten_levels(cls_maps, box_maps, num_anchors: int):
  """Per-level NHWC head maps [B, H, W, A*C] / [B, H, W, A*4] -> lists of [B, H*W*A, C] and
  [B, H*W*A, 4], in the anchors' order."""
  cls = [m.reshape(m.shape[0], -1, m.shape[-1] // num_anchors) for m in cls_maps]
  return cls, [b.reshape(b.shape[0], -1, 4) for b in box_maps]


def anchors_and_flags(cls_maps, image_size, settings: RetinaNetSettings):
  """(per-level anchors [A_l, 4], per-level valid flags [B, A_l]) for the maps' sizes."""
  sizes = [tuple(m.shape[1:3]) for m in cls_maps]
  divisor = settings.size_divisor
  pad_size = (jnp.asarray(image_size, jnp.int32) + divisor - 1) // divisor * divisor
  flags = jax.vmap(lambda pad: settings.anchor_generator.valid_flags(sizes, pad))(pad_size)
  return settings.anchor_generator.anchors(sizes), flags


def loss(cls_maps, box_maps, batch: dict, settings: RetinaNetSettings = RetinaNetSettings()):
  """(loss, metrics) of a training batch from the head's per-level maps."""
  cls, box = flatten_levels(cls_maps, box_maps, settings.anchor_generator.num_anchors)
  anchors, flags = anchors_and_flags(cls_maps, batch["image_size"], settings)
  num_classes = cls[0].shape[-1]

  def image_targets(valid, gt_boxes, gt_labels, gt_valid):
    return anchor_targets(jnp.concatenate(anchors), valid, gt_boxes, gt_labels, gt_valid,
                          num_classes, settings.assigner, settings.target_means,
                          settings.target_stds)

  targets = jax.vmap(image_targets)(jnp.concatenate(flags, 1), batch["boxes"].astype(jnp.float32),
                                    batch["labels"], batch["box_mask"])
  targets = jax.tree.map(jax.lax.stop_gradient, targets)
  return retinanet_loss(jnp.concatenate(cls, 1), jnp.concatenate(box, 1), targets,
                        settings.images_per_group, settings.focal_gamma, settings.focal_alpha)


def predict(cls_maps, box_maps, image_size, settings: RetinaNetSettings = RetinaNetSettings()):
  """Batched `inference.detect`: 'boxes' [B, K, 4] in resized-image pixels, 'scores', 'labels',
  'valid' [B, K]."""
  cls, box = flatten_levels(cls_maps, box_maps, settings.anchor_generator.num_anchors)
  anchors, flags = anchors_and_flags(cls_maps, image_size, settings)

  def image_detections(cls_i, box_i, flags_i, size_i):
    return detect(cls_i, box_i, anchors, flags_i, size_i, settings.inference,
                  settings.target_means, settings.target_stds)

  return jax.vmap(image_detections)(cls, box, flags, jnp.asarray(image_size))
