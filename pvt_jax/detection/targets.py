"""Training targets of an anchor head: mmdet's `MaxIoUAssigner` + `PseudoSampler` + DeltaXYWH
coding, per image with static shapes (vmap over a batch).

Padded ground-truth rows (`gt_valid` False) and anchors outside the image's padded region
(`anchor_valid` False, mmdet's valid flags with `allowed_border=-1`) take no part: invalid anchors
get IoU -1 with everything, so they are never negative, positive or any box's best match, and
their classification and regression weights are 0, as mmdet's `unmap` leaves them.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pvt_jax.detection import boxes as box_ops


@dataclasses.dataclass(frozen=True)
class MaxIoUAssigner:
  """Anchor -> ground truth: positive at IoU >= pos_iou_thr with its best box, negative below
  neg_iou_thr, ignored in between; then every box also claims its best anchors (all anchors tied
  at its highest IoU with `gt_max_assign_all`) if that IoU is >= min_pos_iou, later boxes
  overriding earlier ones, exactly as mmdet's loop over the boxes does."""
  pos_iou_thr: float = 0.5
  neg_iou_thr: float = 0.4
  min_pos_iou: float = 0.0
  gt_max_assign_all: bool = True
  match_low_quality: bool = True

  def assign(self, anchors, anchor_valid, gt_boxes, gt_valid):
    """int32 [A]: -1 ignored, 0 negative, k + 1 positive for ground truth k."""
    pair_valid = gt_valid[:, None] & anchor_valid[None, :]
    overlaps = jnp.where(pair_valid, box_ops.iou_matrix(gt_boxes, anchors), -1.0)  # [G, A]
    max_overlaps = overlaps.max(0)
    best_gt = overlaps.argmax(0).astype(jnp.int32)
    assigned = jnp.full(anchors.shape[:1], -1, jnp.int32)
    assigned = jnp.where((max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr), 0, assigned)
    assigned = jnp.where(max_overlaps >= self.pos_iou_thr, best_gt + 1, assigned)
    if self.match_low_quality:
      gt_max = overlaps.max(1)
      if self.gt_max_assign_all:
        claims = overlaps == gt_max[:, None]
      else:
        claims = jax.nn.one_hot(overlaps.argmax(1), anchors.shape[0], dtype=jnp.bool_)
      claims &= (gt_valid & (gt_max >= self.min_pos_iou))[:, None]
      order = jnp.arange(gt_boxes.shape[0], dtype=jnp.int32)[:, None]
      last_claim = jnp.where(claims, order, -1).max(0)  # the loop's last writer wins
      assigned = jnp.where(last_claim >= 0, last_claim + 1, assigned)
    # No ground truth at all: every anchor is a negative (mmdet's num_gts == 0 branch).
    return jnp.where(gt_valid.any(), assigned, 0)


def anchor_targets(anchors, anchor_valid, gt_boxes, gt_labels, gt_valid, num_classes: int,
                   assigner: MaxIoUAssigner = MaxIoUAssigner(),
                   means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)) -> dict:
  """Per anchor of one image: 'labels' (num_classes = background), 'label_weights',
  'box_targets' [A, 4] (DeltaXYWH, zero where not positive), 'box_weights' and 'num_pos'."""
  assigned = assigner.assign(anchors, anchor_valid, gt_boxes, gt_valid)
  positive = (assigned > 0) & anchor_valid
  matched = jnp.maximum(assigned - 1, 0)
  # Non-positive anchors are encoded against themselves: zero targets and no log(0) anywhere.
  matched_boxes = jnp.where(positive[:, None], gt_boxes[matched], anchors)
  return {
      "labels": jnp.where(positive, gt_labels[matched], num_classes).astype(jnp.int32),
      "label_weights": (positive | ((assigned == 0) & anchor_valid)).astype(jnp.float32),
      "box_targets": jnp.where(positive[:, None],
                               box_ops.encode(anchors, matched_boxes, means, stds), 0.0),
      "box_weights": positive.astype(jnp.float32),
      "num_pos": positive.sum(),
  }
