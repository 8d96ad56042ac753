"""RetinaNet inference with static shapes: mmdet's `predict_by_feat` for one image (vmap over a
batch), returning a fixed number of detections and a validity mask.

Per level the (anchor, class) pairs scoring above `score_thr` are ranked and the best `nms_pre`
kept (mmdet's `filter_scores_and_topk`); their boxes are decoded and clipped to the image, boxes
no wider or taller than `min_bbox_size` dropped, and class-wise greedy NMS keeps at most
`max_per_img`, in descending score order.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pvt_jax.detection import boxes as box_ops


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """mmdet's RetinaNet `test_cfg` (min_bbox_size < 0 keeps every box)."""
  nms_pre: int = 1000
  score_thr: float = 0.05
  iou_threshold: float = 0.5
  max_per_img: int = 100
  min_bbox_size: float = 0.0


def batched_nms(boxes, scores, labels, valid, iou_threshold: float, max_outputs: int):
  """Class-wise greedy NMS: (indices [max_outputs] of the kept boxes in descending score order,
  bool [max_outputs] marking the real ones). A box is suppressed by a kept box of its class with
  IoU > iou_threshold, as in torchvision's `batched_nms`.

  Greedy NMS keeps boxes in score order, so its first `max_outputs` keeps are `max_outputs`
  rounds of "take the best remaining box, suppress its overlaps": O(max_outputs * N) rather than
  the O(N^2) IoU matrix, which matters for N = 5 levels x nms_pre candidates.
  """
  boxes, scores, labels = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels)
  areas = box_ops.area(boxes)

  def pick(remaining, _):
    best = jnp.argmax(remaining)
    found = remaining[best] > -jnp.inf
    top_left = jnp.maximum(boxes[best, :2], boxes[:, :2])
    bottom_right = jnp.minimum(boxes[best, 2:], boxes[:, 2:])
    overlap = jnp.prod(jnp.maximum(bottom_right - top_left, 0.0), axis=-1)
    iou = overlap / (areas[best] + areas - overlap)
    suppressed = ((labels == labels[best]) & (iou > iou_threshold)) | (jnp.arange(len(boxes))
                                                                        == best)
    return jnp.where(suppressed & found, -jnp.inf, remaining), (best, found)

  start = jnp.where(valid, scores, -jnp.inf)
  _, (kept, found) = jax.lax.scan(pick, start, None, length=max_outputs)
  return kept.astype(jnp.int32), found


def _level_candidates(cls_logits, box_deltas, anchors, anchor_valid, settings):
  """The level's best (anchor, class) pairs above the threshold: scores, labels, deltas, anchors
  and a validity mask, `min(nms_pre, A * C)` of each."""
  num_classes = cls_logits.shape[-1]
  scores = jax.nn.sigmoid(cls_logits.astype(jnp.float32))
  keep = (scores > settings.score_thr) & anchor_valid[:, None]
  flat = jnp.where(keep, scores, -1.0).reshape(-1)
  k = flat.shape[0] if settings.nms_pre <= 0 else min(settings.nms_pre, flat.shape[0])
  top_scores, top = jax.lax.top_k(flat, k)
  anchor_index = top // num_classes
  return (top_scores, (top % num_classes).astype(jnp.int32), box_deltas[anchor_index],
          anchors[anchor_index], top_scores > settings.score_thr)


def detect(cls_logits, box_deltas, anchors, anchor_valid, image_size,
           settings: InferenceSettings = InferenceSettings(), means=(0.0, 0.0, 0.0, 0.0),
           stds=(1.0, 1.0, 1.0, 1.0)) -> dict:
  """Detections of one image from per-level lists of cls_logits [A_l, C], box_deltas [A_l, 4],
  anchors [A_l, 4] and anchor_valid [A_l] (anchors on the image's padded region; mmdet's padded
  image has no others); image_size = (h, w) of the resized image, for clipping.

  Returns 'boxes' [K, 4] (resized-image pixels), 'scores' [K], 'labels' [K] (int32) and 'valid'
  [K] (K = max_per_img); rows past the valid ones are zero. `means`/`stds`: the box coder's.
  """
  levels = [_level_candidates(*level, settings)
            for level in zip(cls_logits, box_deltas, anchors, anchor_valid, strict=True)]
  scores, labels, deltas, level_anchors, valid = (jnp.concatenate(parts) for parts in
                                                  zip(*levels, strict=True))
  boxes = box_ops.decode(level_anchors, deltas.astype(jnp.float32), image_size, means, stds)
  if settings.min_bbox_size >= 0:
    valid &= ((boxes[:, 2] - boxes[:, 0]) > settings.min_bbox_size) & (
        (boxes[:, 3] - boxes[:, 1]) > settings.min_bbox_size)
  kept, found = batched_nms(boxes, scores, labels, valid, settings.iou_threshold,
                            settings.max_per_img)
  return {"boxes": jnp.where(found[:, None], boxes[kept], 0.0),
          "scores": jnp.where(found, scores[kept], 0.0),
          "labels": jnp.where(found, labels[kept], 0),
          "valid": found}
