"""COCO evaluation of gathered fixed-size detections: boxes mapped back to the stored images,
padding rows dropped, each image once over any number of processes, the PNG of boxes."""

import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_detection_data import _config, _write_sized_dataset

from pvt_jax.data import detection as data
from pvt_jax.data.detection import transforms
from pvt_jax.detection import evaluation


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("eval"))
  sizes = [(30, 70), (45, 60), (60, 45), (33, 80), (70, 30), (50, 50), (41, 66)]
  _write_sized_dataset(root, sizes, "val")
  return _config(dataset=f"coco:{root}", train_split="val", eval_split="val",
                 image_scale=(64, 48), canvas_sizes=((48, 64), (64, 48)), size_divisor=16,
                 eval_batch_size=4)


def _detections(batches, split, jitter=0.0, seed=0):
  """Per eval batch, the ground-truth boxes of each image in resized pixels as K=5 detections
  (score 0.9, then 0.8, ...), optionally jittered."""
  rng = np.random.default_rng(seed)
  outputs = []
  for b in batches:
    n = len(b["mask"])
    out = {"boxes": np.zeros((n, 5, 4), np.float32), "scores": np.zeros((n, 5), np.float32),
           "labels": np.zeros((n, 5), np.int32), "valid": np.zeros((n, 5), bool),
           "image_id": b["image_id"], "scale_factor": b["scale_factor"], "mask": b["mask"]}
    for row in np.flatnonzero(b["mask"]):
      k = int(np.flatnonzero(split.image_ids == b["image_id"][row])[0])
      boxes = split.boxes[k] * np.tile(b["scale_factor"][row], 2)
      boxes = boxes + rng.normal(0, jitter, boxes.shape) * (boxes[:, 2:3] - boxes[:, :1])
      m = len(boxes)
      out["boxes"][row, :m], out["labels"][row, :m] = boxes, split.labels[k]
      out["scores"][row, :m], out["valid"][row, :m] = 0.9 - 0.1 * np.arange(m), True
      out["boxes"][row, m], out["scores"][row, m] = (1, 1, 5, 5), 0.95  # valid False: unused
    outputs.append(out)
  return outputs


def _gather(per_process):
  """What a multi-host gather gives: the processes' rows of each step side by side."""
  return [{k: np.concatenate([p[step][k] for p in per_process]) for k in per_process[0][step]}
          for step in range(len(per_process[0]))]


def test_perfect_and_jittered_detections(eval_config, tmp_path):
  split = data.open_split(eval_config, "val")
  batches = list(data.eval_iterator(eval_config))
  evaluator = evaluation.CocoEvaluator(split.ground_truth, split.category_ids)
  for out in _detections(batches, split):
    evaluator.update(out)
  result = evaluator.result()
  assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
  assert result["num_images"] == len(split) and result["num_detections"] == 2 * len(split)
  assert "Average Precision" in evaluator.summary
  path = str(tmp_path / "detections.json")
  evaluator.save_detections(path)
  with open(path) as f:
    saved = json.load(f)
  truth = COCO(split.ground_truth)
  for det in saved[:4]:  # original-image coordinates and COCO category ids
    ann = [a for a in truth.imgToAnns[det["image_id"]] if a["category_id"] == det["category_id"]]
    np.testing.assert_allclose(det["bbox"], ann[0]["bbox"], atol=1e-3)

  # Jittered boxes, evaluated from two processes' gathered batches, score what pycocotools
  # gives for the same results written by hand.
  per_process = [_detections(list(data.eval_iterator(eval_config, process_index=p,
                                                     process_count=2)), split, 0.1)
                 for p in (0, 1)]
  gathered = evaluation.CocoEvaluator(split.ground_truth, split.category_ids)
  for out in _gather(per_process):
    gathered.update(out)
  result = gathered.result()
  reference = COCOeval(truth, truth.loadRes(gathered.detections), "bbox")
  reference.evaluate()
  reference.accumulate()
  reference.summarize()
  assert 0 < result["AP"] < 1 and result["AP"] == pytest.approx(reference.stats[0])
  assert result["num_images"] == len(split)


def test_an_image_twice_or_unknown_is_an_error(eval_config):
  split = data.open_split(eval_config, "val")
  batches = list(data.eval_iterator(eval_config))
  outputs = _detections(batches, split)
  evaluator = evaluation.CocoEvaluator(split.ground_truth, split.category_ids)
  evaluator.update(outputs[0])
  with pytest.raises(ValueError, match="arrived twice"):
    evaluator.update(outputs[0])
  bad = dict(outputs[1], image_id=np.full_like(outputs[1]["image_id"], 999_999))
  with pytest.raises(ValueError, match="999999 is not in the ground truth"):
    evaluation.CocoEvaluator(split.ground_truth, split.category_ids).update(bad)
  empty = evaluation.CocoEvaluator(split.ground_truth, split.category_ids).result()
  assert empty["AP"] == 0.0 and empty["num_detections"] == 0


def test_drawing_writes_a_png(eval_config, tmp_path):
  split = data.open_split(eval_config, "val")
  batch = next(iter(data.eval_iterator(eval_config)))
  out = _detections([batch], split)[0]
  images = transforms.to_uint8(batch["image"][:2], batch["image_size"][:2])
  evaluator = evaluation.CocoEvaluator(split.ground_truth, split.category_ids)
  truth = evaluator.ground_truth_boxes(batch["image_id"][:2], batch["scale_factor"][:2])
  for key in ("boxes", "labels"):  # the detections are the ground truth
    np.testing.assert_allclose(truth[key][truth["box_mask"]],
                               out[key][:2][out["valid"][:2]], atol=1e-4)
  path = str(tmp_path / "boxes.png")
  evaluation.draw_detections(path, images, out, split.class_names, ground_truth=truth)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 1000
