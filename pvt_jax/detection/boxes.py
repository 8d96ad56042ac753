"""Boxes as [..., 4] arrays (x1, y1, x2, y2) in pixels: IoU and mmdet's DeltaXYWH box coding.

The arithmetic follows mmdet's `bbox_overlaps` (union floored at 1e-6, areas without the +1 of
older codebases) and `DeltaXYWHBBoxCoder` (means 0, stds 1 by default, log-ratio clip at
|log(16 / 1000)|, decoded boxes clipped to the image), operation for operation, so targets and
decoded boxes agree with mmdet to float32 rounding.
"""

import math

import jax.numpy as jnp

WH_RATIO_CLIP = 16 / 1000


def area(boxes):
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def iou_matrix(boxes1, boxes2, eps: float = 1e-6):
  """IoU of each box in `boxes1` [..., N, 4] with each box in `boxes2` [..., M, 4]: [..., N, M]."""
  top_left = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  bottom_right = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(bottom_right - top_left, 0.0)
  overlap = wh[..., 0] * wh[..., 1]
  union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - overlap
  return overlap / jnp.maximum(union, eps)


def encode(anchors, boxes, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)):
  """Regression targets (dx, dy, dw, dh) that move `anchors` onto `boxes` (same shape [..., 4])."""
  px = (anchors[..., 0] + anchors[..., 2]) * 0.5
  py = (anchors[..., 1] + anchors[..., 3]) * 0.5
  pw = anchors[..., 2] - anchors[..., 0]
  ph = anchors[..., 3] - anchors[..., 1]
  gx = (boxes[..., 0] + boxes[..., 2]) * 0.5
  gy = (boxes[..., 1] + boxes[..., 3]) * 0.5
  gw = boxes[..., 2] - boxes[..., 0]
  gh = boxes[..., 3] - boxes[..., 1]
  deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], -1)
  return (deltas - jnp.asarray(means, deltas.dtype)) / jnp.asarray(stds, deltas.dtype)


def decode(anchors, deltas, image_size=None, means=(0.0, 0.0, 0.0, 0.0),
           stds=(1.0, 1.0, 1.0, 1.0), wh_ratio_clip: float = WH_RATIO_CLIP):
  """Boxes from `anchors` moved by `deltas` ([..., 4] each); clipped to [0, w] x [0, h] when
  `image_size` = (h, w) is given (per image: vmap over a batch)."""
  deltas = deltas * jnp.asarray(stds, deltas.dtype) + jnp.asarray(means, deltas.dtype)
  centre = (anchors[..., :2] + anchors[..., 2:]) * 0.5
  size = anchors[..., 2:] - anchors[..., :2]
  max_ratio = abs(math.log(wh_ratio_clip))
  centre = centre + size * deltas[..., :2]
  size = size * jnp.exp(jnp.clip(deltas[..., 2:], -max_ratio, max_ratio))
  boxes = jnp.concatenate([centre - size * 0.5, centre + size * 0.5], -1)
  if image_size is None:
    return boxes
  h, w = jnp.asarray(image_size, boxes.dtype)
  return jnp.clip(boxes, 0.0, jnp.stack([w, h, w, h]))
