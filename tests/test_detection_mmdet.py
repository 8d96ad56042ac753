"""Parity of pvt_jax.detection with mmdet 3.3's real RetinaNet modules (anchors, assignment and
targets, loss, predictions), fp32, at a square and a non-square size not a multiple of 32.

mmdet needs mmcv's compiled ops only for NMS here: a stub `mmcv._ext` lets it import, and
`torchvision.ops.batched_nms` stands in for mmcv's NMS.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.torch

from openmmlab_reference import mmdet_necks  # noqa: E402

from pvt_jax import detection  # noqa: E402
from pvt_jax.detection import anchor_head  # noqa: E402

NUM_CLASSES = 80
STRIDES = (8, 16, 32, 64, 128)


def _mmdet():
  """mmdet with its modules registered (the mmcv._ext stub comes with openmmlab_reference)."""
  mmdet_necks()
  from mmdet.utils import register_all_modules
  register_all_modules()


def _torchvision_batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
  assert not class_agnostic
  keep = torchvision.ops.batched_nms(boxes, scores, idxs, nms_cfg["iou_threshold"])
  return torch.cat([boxes[keep], scores[keep, None]], -1), keep


def _retina_head():
  """mmdet's RetinaHead as the official config builds it (train and test settings)."""
  _mmdet()
  from mmdet.registry import MODELS
  from mmengine.config import ConfigDict
  head = MODELS.build(dict(
      type="RetinaHead", num_classes=NUM_CLASSES, in_channels=8, stacked_convs=1,
      feat_channels=8,
      anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                            ratios=[0.5, 1.0, 2.0], strides=list(STRIDES)),
      bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
      loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
      loss_bbox=dict(type="L1Loss", loss_weight=1.0),
      train_cfg=ConfigDict(dict(
          assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                        ignore_iof_thr=-1),
          sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False)),
      test_cfg=ConfigDict(dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                               nms=dict(type="nms", iou_threshold=0.5), max_per_img=100))))
  return head


def _feature_sizes(height, width):
  """PVT v2 + FPN level sizes: ceil(/8) for P3, then ceil(/2) per level."""
  size = (math.ceil(height / 8), math.ceil(width / 8))
  sizes = [size]
  for _ in STRIDES[1:]:
    size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    sizes.append(size)
  return sizes


def _random_gt(rng, count, height, width):
  """Boxes of many sizes and shapes inside an image, some duplicated (ties in the assigner)."""
  centre = rng.uniform([0, 0], [width, height], (count, 2))
  size = np.exp(rng.uniform(np.log(6), np.log(max(height, width)), (count, 2)))
  boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
  boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
  boxes[-1] = boxes[0]
  return boxes, rng.integers(0, NUM_CLASSES, count)


@pytest.mark.parametrize("height, width", [(256, 256), (200, 296)])
def test_anchors_and_valid_flags_identical(height, width):
  _mmdet()
  from mmdet.models.task_modules.prior_generators import AnchorGenerator
  reference = AnchorGenerator(strides=list(STRIDES), ratios=[0.5, 1.0, 2.0],
                              octave_base_scale=4, scales_per_octave=3)
  sizes = _feature_sizes(height + 64, width + 96)  # a canvas larger than the image
  ours = detection.AnchorGenerator()
  for got, want in zip(ours.anchors(sizes), reference.grid_priors(sizes, device="cpu"),
                       strict=True):
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
  pad = (math.ceil(height / 32) * 32, math.ceil(width / 32) * 32)
  for got, want in zip(ours.valid_flags(sizes, pad),
                       reference.valid_flags(sizes, pad, device="cpu"), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def _head_inputs(rng, sizes, batch, logit_mean=-4.0):
  cls = [rng.normal(logit_mean, 1.5, (batch, h, w, 9 * NUM_CLASSES)).astype(np.float32)
         for h, w in sizes]
  box = [rng.normal(0, 0.5, (batch, h, w, 36)).astype(np.float32) for h, w in sizes]
  return cls, box


def _nchw(maps):
  return [torch.from_numpy(np.ascontiguousarray(m.transpose(0, 3, 1, 2))) for m in maps]


@pytest.mark.parametrize("images", [[(256, 256), (256, 256)], [(200, 296), (160, 230)]])
def test_targets_and_loss_match_mmdet(images):
  """Two images on one canvas (the second smaller: its padding anchors are invalid), 7 and 0
  ground truths padded to 9 rows; targets and losses against RetinaHead.get_targets/loss."""
  from mmengine.structures import InstanceData
  head = _retina_head()
  rng = np.random.default_rng(0)
  canvas = (max(h for h, _ in images), max(w for _, w in images))
  canvas = tuple(math.ceil(s / 32) * 32 for s in canvas)
  sizes = _feature_sizes(*canvas)
  counts = (7, 0)
  gts = [_random_gt(rng, n, h, w) if n else (np.zeros((0, 4), np.float32), np.zeros(0, int))
         for n, (h, w) in zip(counts, images, strict=True)]
  cls, box = _head_inputs(rng, sizes, len(images), logit_mean=-2.0)
  metas = [{"img_shape": (h, w), "pad_shape": tuple(math.ceil(s / 32) * 32 for s in (h, w)),
            "batch_input_shape": canvas} for h, w in images]
  instances = [InstanceData(bboxes=torch.from_numpy(b), labels=torch.from_numpy(lab))
               for b, lab in gts]
  mm_loss = head.loss_by_feat(_nchw(cls), _nchw(box), instances, metas)

  max_gt = 9
  batch = {"image_size": np.array(images, np.int32),
           "boxes": np.zeros((len(images), max_gt, 4), np.float32),
           "labels": np.zeros((len(images), max_gt), np.int32),
           "box_mask": np.zeros((len(images), max_gt), bool)}
  for i, (b, lab) in enumerate(gts):
    batch["boxes"][i, :len(b)], batch["labels"][i, :len(b)] = b, lab
    batch["box_mask"][i, :len(b)] = True
  loss, metrics = jax.jit(detection.loss)(cls, box, batch)
  np.testing.assert_allclose(metrics["loss_cls"], sum(mm_loss["loss_cls"]).item(), rtol=2e-5)
  np.testing.assert_allclose(metrics["loss_box"], sum(mm_loss["loss_bbox"]).item(), rtol=2e-5)
  np.testing.assert_allclose(loss, metrics["loss_cls"] + metrics["loss_box"], rtol=1e-6)

  # Targets element by element.
  anchor_list, flag_list = head.get_anchors(sizes, metas, device="cpu")
  (labels, label_weights, box_targets, box_weights, avg_factor) = head.get_targets(
      anchor_list, flag_list, instances, metas)
  settings = detection.RetinaNetSettings()
  anchors, flags = anchor_head.anchors_and_flags(cls, batch["image_size"], settings)
  ours = jax.vmap(lambda valid, b, lab, m: detection.anchor_targets(
      jnp.concatenate(anchors), valid, b, lab, m, NUM_CLASSES))(
          jnp.concatenate(flags, 1), batch["boxes"], batch["labels"], batch["box_mask"])
  np.testing.assert_array_equal(ours["labels"], torch.cat(labels, 1).numpy())
  np.testing.assert_array_equal(ours["label_weights"], torch.cat(label_weights, 1).numpy())
  np.testing.assert_allclose(ours["box_targets"], torch.cat(box_targets, 1).numpy(), atol=1e-5)
  np.testing.assert_array_equal(ours["box_weights"], torch.cat(box_weights, 1).numpy()[..., 0])
  assert int(jnp.maximum(ours["num_pos"], 1).sum()) == avg_factor
  assert int(ours["num_pos"][0]) >= counts[0]  # every box has its best anchor


def test_assigner_ties_and_thresholds_match_mmdet():
  """Hand-made overlaps hitting the thresholds exactly, boxes sharing their best anchors, and a
  later box overriding an earlier one's claim: assigned indices equal mmdet's."""
  _mmdet()
  from mmdet.models.task_modules.assigners import MaxIoUAssigner
  from mmengine.structures import InstanceData
  rng = np.random.default_rng(1)
  anchors = detection.AnchorGenerator().level_anchors(0, (6, 7))
  anchors = np.asarray(anchors)
  gt = np.concatenate([anchors[[10, 10, 50, 200]], _random_gt(rng, 5, 48, 56)[0]])
  gt[2] = anchors[50] + np.array([0, 0, 4, 0], np.float32)  # IoU near the thresholds
  for all_ties in (True, False):
    reference = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0, gt_max_assign_all=all_ties)
    want = reference.assign(InstanceData(priors=torch.from_numpy(anchors)),
                            InstanceData(bboxes=torch.from_numpy(gt),
                                         labels=torch.zeros(len(gt), dtype=torch.long)))
    ours = detection.MaxIoUAssigner(gt_max_assign_all=all_ties).assign(
        anchors, np.ones(len(anchors), bool), np.concatenate([gt, np.zeros((3, 4), np.float32)]),
        np.arange(len(gt) + 3) < len(gt))
    np.testing.assert_array_equal(ours, want.gt_inds.numpy())


@pytest.mark.parametrize("image, canvas", [((256, 256), (256, 256)), ((200, 296), (256, 352))])
def test_predictions_match_mmdet(monkeypatch, image, canvas):
  """Detections from one image on a larger canvas equal mmdet's predict_by_feat on the same
  logits cropped to the image's padded region (mmdet's test-time batch of one)."""
  _mmdet()
  import mmdet.models.dense_heads.base_dense_head as base_dense_head
  monkeypatch.setattr(base_dense_head, "batched_nms", _torchvision_batched_nms)
  head = _retina_head()
  rng = np.random.default_rng(2)
  sizes = _feature_sizes(*canvas)
  cls, box = _head_inputs(rng, sizes, 1)
  pad = tuple(math.ceil(s / 32) * 32 for s in image)
  crop = _feature_sizes(*pad)
  cropped = [[m[:, :h, :w] for m, (h, w) in zip(maps, crop, strict=True)] for maps in (cls, box)]
  result = head.predict_by_feat(_nchw(cropped[0]), _nchw(cropped[1]),
                                batch_img_metas=[{"img_shape": image}], rescale=False)[0]
  ours = jax.jit(detection.predict)(cls, box, np.array([image], np.int32))
  count = int(ours["valid"][0].sum())
  assert count == len(result.scores) == 100  # enough candidates for the cap to matter
  np.testing.assert_allclose(ours["scores"][0, :count], result.scores.numpy(), rtol=1e-6)
  np.testing.assert_array_equal(ours["labels"][0, :count], result.labels.numpy())
  np.testing.assert_allclose(ours["boxes"][0, :count], result.bboxes.numpy(), atol=1e-4)
