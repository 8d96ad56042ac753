"""An offline detection set from the Fashion-MNIST idx files: 1-4 garments per canvas at random
sizes and positions, each box the extent of its garment's foreground pixels, classes 0..9.

The set is a deterministic function of the idx files and `SyntheticSettings` (train items come
from Fashion-MNIST's train images, val items from its test images), built in memory in a second,
and exportable in the COCO layout (PNG images + instances json) so that COCOeval, and the
COCO-json reader, run on it unchanged.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from pvt_jax.data import fashion_mnist
from pvt_jax.data.detection.index import DetectionSplit, coco_ground_truth
from pvt_jax.data.detection.readers import ArrayReader
from pvt_jax.data.errors import DatasetError

SPLITS = {"train": "train", "val": "test"}  # our split -> the Fashion-MNIST split it draws from
_FOREGROUND = 0  # pixels above this value belong to the garment
MAX_OVERLAP = 0.3  # largest IoU of a new item's box with those already placed
_PLACEMENT_TRIES = 10


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
  image_size: int = 128
  num_train: int = 2000
  num_val: int = 500
  max_items: int = 4
  item_size: tuple[int, int] = (24, 72)  # side of the pasted 28x28 item, in pixels


def _paste(canvas, item, top, left):
  h, w = item.shape
  np.maximum(canvas[top:top + h, left:left + w], item, out=canvas[top:top + h, left:left + w])


def _max_iou(boxes: np.ndarray, box: np.ndarray) -> float:
  wh = np.clip(np.minimum(boxes[:, 2:], box[2:]) - np.maximum(boxes[:, :2], box[:2]), 0, None)
  overlap = wh[:, 0] * wh[:, 1]
  areas = np.prod(boxes[:, 2:] - boxes[:, :2], 1)
  return float((overlap / (areas + np.prod(box[2:] - box[:2]) - overlap)).max())


def generate(items: np.ndarray, item_labels: np.ndarray, count: int, settings: SyntheticSettings,
             seed: int):
  """(images uint8 [count, S, S], boxes per image [n, 4], labels per image [n])."""
  rng = np.random.default_rng(seed)
  size = settings.image_size
  lo, hi = settings.item_size
  if not 0 < lo <= hi <= size:
    raise DatasetError(f"synthetic item_size {settings.item_size} must lie within (0, "
                       f"image_size={size}]")
  images = np.zeros((count, size, size), np.uint8)
  all_boxes, all_labels = [], []
  for n in range(count):
    boxes, labels = [], []
    for _ in range(rng.integers(1, settings.max_items + 1)):
      k = rng.integers(len(items))
      side = int(rng.integers(lo, hi + 1))
      grid = np.arange(side) * 28 // side  # nearest-neighbour scaling of the 28x28 item
      item = items[k][grid[:, None], grid[None, :]]
      rows = np.flatnonzero((item > _FOREGROUND).any(1))
      cols = np.flatnonzero((item > _FOREGROUND).any(0))
      if not len(rows):
        continue
      for _ in range(_PLACEMENT_TRIES):  # a free-ish spot: IoU <= MAX_OVERLAP with the others
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = [left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1]
        if not boxes or _max_iou(np.array(boxes), np.array(box)) <= MAX_OVERLAP:
          _paste(images[n], item, top, left)
          boxes.append(box)
          labels.append(int(item_labels[k]))
          break
    all_boxes.append(np.array(boxes, np.float32).reshape(-1, 4))
    all_labels.append(np.array(labels, np.int32))
  return images, all_boxes, all_labels


def open_synthetic_split(fashion_dir: str, split: str,
                         settings: SyntheticSettings = SyntheticSettings()) -> DetectionSplit:
  if split not in SPLITS:
    raise DatasetError(f"fashion_mnist detection has splits {', '.join(SPLITS)}, not {split!r}")
  missing = fashion_mnist.missing_files(fashion_dir)
  if missing:
    raise DatasetError(f"{fashion_dir}: Fashion-MNIST idx files missing ({', '.join(missing)}); "
                       f"{fashion_mnist.INSTALL_HINT}")
  try:
    items, item_labels = fashion_mnist.read_split(fashion_dir, SPLITS[split])
  except ValueError as error:
    raise DatasetError(str(error)) from None
  count = settings.num_train if split == "train" else settings.num_val
  images, boxes, labels = generate(items, item_labels, count, settings,
                                   seed=list(SPLITS).index(split))
  ids = np.arange(1, count + 1, dtype=np.int64)
  sizes = np.full((count, 2), settings.image_size, np.int32)
  category_ids = tuple(range(1, len(fashion_mnist.CLASS_NAMES) + 1))
  annotations = [(np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1), lab + 1,
                  np.zeros(len(b), bool), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
                 for b, lab in zip(boxes, labels, strict=True)]
  name = f"fashion_mnist detection {split}"
  truth = coco_ground_truth(name, fashion_mnist.CLASS_NAMES, category_ids, ids, sizes,
                            annotations)
  return DetectionSplit(name, fashion_mnist.CLASS_NAMES, category_ids, ids, sizes, tuple(boxes),
                        tuple(labels), truth, ArrayReader(images))


def export_coco_layout(split: DetectionSplit, root: str, split_name: str) -> str:
  """Writes `root/<split_name>/<id>.png` and `root/annotations/instances_<split_name>.json` (a
  synthetic split's images and ground truth); returns the json's path."""
  image_dir = os.path.join(root, split_name)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  truth = json.loads(json.dumps(split.ground_truth))
  for k, image in enumerate(truth["images"]):
    image["file_name"] = f"{image['id']}.png"
    pixels = split.reader.read(tf.constant(k, tf.int64))
    tf.io.write_file(os.path.join(image_dir, image["file_name"]), tf.io.encode_png(pixels))
  path = os.path.join(root, "annotations", f"instances_{split_name}.json")
  with open(path, "w") as f:
    json.dump(truth, f)
  return path
