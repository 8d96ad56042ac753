"""A detection split as an index: per image its id, size and training boxes, a reader of its
pixels, and the COCO-format ground truth that COCOeval scores against.

Training boxes follow mmdet's `CocoDataset` parsing: crowd boxes are left out (the official
RetinaNet config has no ignore regions), and boxes narrower or shorter than 1 px, of zero area,
entirely outside the image or of an unknown category are dropped. Every drop is counted and
logged, never silent; evaluation always scores against the unchanged ground truth.
"""

import collections
import dataclasses
from typing import Any

import numpy as np
from absl import logging

from pvt_jax.data.errors import DatasetError


@dataclasses.dataclass(frozen=True, eq=False)  # compared (and cached) by identity
class DetectionSplit:
  """One split. `reader.read(index)` maps a tf int64 scalar to a uint8 [h, w, 3] tf image."""
  name: str
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]  # the ground truth's category id of each contiguous class
  image_ids: np.ndarray  # int64 [N]
  sizes: np.ndarray  # int32 [N, 2], (height, width) of the stored image
  boxes: tuple  # per image float32 [n, 4], x1 y1 x2 y2 in stored-image pixels
  labels: tuple  # per image int32 [n], 0 .. num_classes - 1
  ground_truth: Any  # COCO-format dict, or the path of the json file
  reader: Any

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.image_ids)

  def subset(self, keep: np.ndarray) -> "DetectionSplit":
    """The images where `keep` (bool [N]) is set, same ground truth and reader."""
    where = np.flatnonzero(keep)
    return dataclasses.replace(self, image_ids=self.image_ids[where], sizes=self.sizes[where],
                               boxes=tuple(self.boxes[i] for i in where),
                               labels=tuple(self.labels[i] for i in where),
                               reader=self.reader.subset(where))


class BoxCleaner:
  """Turns a split's raw annotations into training boxes, counting what it leaves out."""

  def __init__(self, name: str, category_ids):
    self.name = name
    self.contiguous = {int(c): k for k, c in enumerate(category_ids)}
    self.counts = collections.Counter()

  def __call__(self, xywh, category_ids, crowd, area, height: int, width: int):
    """(float32 [n, 4] x1 y1 x2 y2, int32 [n] labels) of one image's usable boxes."""
    xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    x, y, w, h = xywh.T
    known = np.array([int(c) in self.contiguous for c in category_ids], bool)
    crowd = np.asarray(crowd, bool).reshape(-1)
    degenerate = (w < 1) | (h < 1) | (np.asarray(area, np.float64).reshape(-1) <= 0)
    inter_w = np.minimum(x + w, width) - np.maximum(x, 0)
    inter_h = np.minimum(y + h, height) - np.maximum(y, 0)
    outside = ~degenerate & ((np.maximum(inter_w, 0) * np.maximum(inter_h, 0)) == 0)
    self.counts["crowd"] += int((crowd & known).sum())
    self.counts["unknown category"] += int((~known).sum())
    self.counts["narrower or shorter than 1 px or zero area"] += int((known & ~crowd
                                                                      & degenerate).sum())
    self.counts["outside the image"] += int((known & ~crowd & outside).sum())
    keep = known & ~crowd & ~degenerate & ~outside
    boxes = np.stack([x, y, x + w, y + h], 1)[keep].astype(np.float32)
    labels = np.array([self.contiguous[int(c)] for c in np.asarray(category_ids)[keep]],
                      np.int32)
    return boxes, labels

  def report(self) -> None:
    dropped = {k: v for k, v in self.counts.items() if v and k != "crowd"}
    message = f"{self.name}: {self.counts['crowd']} crowd boxes not used for training"
    if dropped:
      message += "; dropped boxes: " + ", ".join(f"{v} {k}" for k, v in dropped.items())
      logging.warning(message)
    else:
      logging.info(message)


def coco_ground_truth(split_name, class_names, category_ids, image_ids, sizes, annotations):
  """A COCO-format ground-truth dict. `annotations`: per image (xywh [n, 4], category ids [n],
  crowd [n], area [n])."""
  images = [{"id": int(i), "height": int(h), "width": int(w), "file_name": f"{int(i)}"}
            for i, (h, w) in zip(image_ids, sizes, strict=True)]
  anns = []
  for image_id, (xywh, cats, crowd, area) in zip(image_ids, annotations, strict=True):
    for box, cat, is_crowd, a in zip(np.asarray(xywh).reshape(-1, 4), cats, crowd, area,
                                     strict=True):
      anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": int(cat),
                   "bbox": [float(v) for v in box], "area": float(a), "iscrowd": int(is_crowd)})
  categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, class_names, strict=True)]
  return {"info": {"description": split_name}, "images": images, "annotations": anns,
          "categories": categories}


def check_max_boxes(split: DetectionSplit, max_boxes: int) -> None:
  counts = np.array([len(b) for b in split.boxes])
  if len(counts) and counts.max() > max_boxes:
    worst = int(np.argmax(counts))
    raise DatasetError(f"{split.name}: image {int(split.image_ids[worst])} has {counts[worst]} "
                       f"boxes, more than max_boxes={max_boxes}; raise config.max_boxes")
