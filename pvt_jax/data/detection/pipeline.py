"""Detection input pipelines: host-local numpy batches of fixed shapes, like the classification
pipeline's, for a jitted step sharded over the batch.

Images are resized (keep ratio, mmdet's rounding) and padded to one of a few canvases
(`config.canvas_sizes`; by default landscape 800x1344 and portrait 1344x800, mmdet's
aspect-ratio grouping), each image to the first canvas that holds it at the largest scale, and
every batch holds images of one canvas. Ground truth is padded to `config.max_boxes` rows.

Training batches are drawn per epoch from a shuffle seeded by (seed, epoch): the shuffled images
are dealt into per-canvas batches of the global batch size in the order the batches fill (each
canvas's last, partial batch is dropped, so an epoch has sum over canvases of n_c // batch
steps), and process p reads rows [p * local, (p + 1) * local) of each: disjoint reads, the same
global batches on any number of processes, and augmentation (flip, multi-scale short side) a
function of (seed, epoch, position in the epoch). Resuming at step N recomputes the schedule and
reads nothing before it.

Evaluation goes over each canvas's images in order, padded to whole global batches with
mask=False rows (all-zero images), so each image is in exactly one row with mask=True on one
process, and every process yields the same number of batches.
"""

import dataclasses
import functools
import itertools
import math

import numpy as np
import tensorflow as tf
from absl import logging

from pvt_jax.data.detection import transforms
from pvt_jax.data.detection.coco import open_coco_split
from pvt_jax.data.detection.index import DetectionSplit, check_max_boxes
from pvt_jax.data.detection.synthetic import SyntheticSettings, open_synthetic_split
from pvt_jax.data.detection.tfds_source import open_tfds_split
from pvt_jax.data.errors import DatasetError
from pvt_jax.data.pipeline import _local_batch, _process  # the classification pipeline's rules

# Bound at import: the except clause below can run at interpreter exit, when `tf` may be gone.
_DecodeError = tf.errors.InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class DetectionInfo:
  name: str
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  num_train_images: int  # after the training filters
  num_eval_images: int
  steps_per_epoch: int
  train_split: str
  eval_split: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@functools.lru_cache(maxsize=8)
def _open(dataset: str, split: str, data_dir, fashion_mnist_dir, synthetic) -> DetectionSplit:
  if dataset == "fashion_mnist":
    opened = open_synthetic_split(fashion_mnist_dir, split, SyntheticSettings(*synthetic))
  elif dataset.startswith("coco:"):
    opened = open_coco_split(dataset[len("coco:"):], split)
  elif dataset.startswith("tfds:"):
    opened = open_tfds_split(dataset[len("tfds:"):], split, data_dir)
  else:
    raise DatasetError(f"unknown detection dataset {dataset!r}: use fashion_mnist, "
                       f"coco:/path/to/root (COCO layout) or tfds:coco/2017")
  if not len(opened):
    raise DatasetError(f"{opened.name}: no images")
  return opened


def open_split(config, split: str) -> DetectionSplit:
  """The split `split` of config.dataset (opened once per process)."""
  s = config.synthetic
  synthetic = (s.image_size, s.num_train, s.num_val, s.max_items, tuple(s.item_size))
  return _open(config.dataset, split, config.data_dir, config.fashion_mnist_dir, synthetic)


@functools.lru_cache(maxsize=8)
def _filter_train(split: DetectionSplit, min_size: int) -> DetectionSplit:
  """mmdet's `filter_cfg` for training: images without a box or smaller than min_size go."""
  empty = np.array([len(b) == 0 for b in split.boxes])
  small = split.sizes.min(1) < min_size
  if (empty | small).all():
    raise DatasetError(f"{split.name}: no image has a box and is at least {min_size} px")
  if (empty | small).any():
    logging.info("%s: %d images without boxes and %d smaller than %d px not used for training",
                 split.name, int(empty.sum()), int((small & ~empty).sum()), min_size)
  return split.subset(~(empty | small))


def train_split(config) -> DetectionSplit:
  split = _filter_train(open_split(config, config.train_split), config.min_image_size)
  check_max_boxes(split, config.max_boxes)
  return split


def _short_range(config) -> tuple[int, int]:
  """Short side per training image: config.aug.multiscale_short (lo, hi) inclusive, or fixed."""
  short = tuple(config.aug.multiscale_short) or (min(config.image_scale),) * 2
  if len(short) != 2 or short[0] > short[1]:
    raise DatasetError(f"aug.multiscale_short={tuple(config.aug.multiscale_short)} must be "
                       f"() or (lo, hi) with lo <= hi")
  return short


def _canvases(config, split: DetectionSplit, short_max: int) -> np.ndarray:
  largest = transforms.resized_sizes(split.sizes, max(config.image_scale), short_max)
  try:
    return transforms.assign_canvases(largest, config.canvas_sizes, config.size_divisor,
                                      split.name)
  except ValueError as error:
    raise DatasetError(str(error)) from None


def epoch_schedule(canvases: np.ndarray, global_batch: int, seed: int, epoch: int) -> np.ndarray:
  """int [steps, global_batch]: the epoch's batches of image indices, each of one canvas, in the
  order they fill while dealing a (seed, epoch) shuffle of all images."""
  order = np.random.default_rng([seed, epoch]).permutation(len(canvases))
  dealt = canvases[order]
  batches, completed = [], []
  for canvas in np.unique(canvases):
    positions = np.flatnonzero(dealt == canvas)
    full = len(positions) // global_batch * global_batch
    batches.append(order[positions[:full]].reshape(-1, global_batch))
    completed.append(positions[global_batch - 1:full:global_batch])
  return np.concatenate(batches)[np.argsort(np.concatenate(completed), kind="stable")]


def steps_per_epoch(canvases: np.ndarray, global_batch: int) -> int:
  return int((np.bincount(canvases) // global_batch).sum())


def dataset_info(config) -> DetectionInfo:
  train = train_split(config)
  evaluation = open_split(config, config.eval_split)
  steps = steps_per_epoch(_canvases(config, train, _short_range(config)[1]), config.batch_size)
  return DetectionInfo(train.name, train.class_names, train.category_ids, len(train),
                       len(evaluation), steps, config.train_split, config.eval_split)


def _numpy_batches(ds: tf.data.Dataset, what: str):
  try:
    yield from ds.as_numpy_iterator()
  except _DecodeError as error:
    raise DatasetError(f"{what}: cannot decode an image: "
                       f"{error.message.strip().splitlines()[0]}") from None


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_iterator(config, start_step: int = 0, *, process_index: int | None = None,
                   process_count: int | None = None):
  """Infinite iterator of this process's batches from step `start_step` on: 'image' float32
  [b, H, W, 3] (one canvas per batch), 'image_size' int32 [b, 2] (resized h, w), 'boxes'
  float32 [b, G, 4], 'labels' int32 [b, G], 'box_mask' bool [b, G] (G = config.max_boxes)."""
  index, count = _process(process_index, process_count)
  split = train_split(config)
  local = _local_batch(config.batch_size, count, "batch_size")
  short_lo, short_hi = _short_range(config)
  canvases = _canvases(config, split, short_hi)
  canvas_sizes = np.asarray(config.canvas_sizes, np.int32).reshape(-1, 2)
  steps = steps_per_epoch(canvases, config.batch_size)
  if not steps:
    raise DatasetError(f"{split.name}: {len(split)} training images give no full batch of "
                       f"{config.batch_size} on any canvas")
  long_edge, max_boxes, flip_prob = max(config.image_scale), config.max_boxes, config.aug.hflip

  def examples(epoch: int, first_step: int):
    schedule = epoch_schedule(canvases, config.batch_size, config.seed, epoch)
    rng = np.random.default_rng([config.seed, epoch, 1])
    flips = rng.random(schedule.size) < flip_prob
    shorts = short_lo + (rng.random(schedule.size) * (short_hi - short_lo + 1)).astype(int)
    for step in range(first_step, steps):
      for slot in range(index * local, (index + 1) * local):
        i, position = schedule[step, slot], step * config.batch_size + slot
        size = split.sizes[i]
        new_size = transforms.resized_sizes(size[None], long_edge, shorts[position])[0]
        boxes = np.zeros((max_boxes, 4), np.float32)
        labels = np.zeros(max_boxes, np.int32)
        n = len(split.boxes[i])
        boxes[:n] = transforms.transform_boxes(split.boxes[i], size, new_size, flips[position])
        labels[:n] = split.labels[i]
        yield {"index": i, "new_size": new_size, "flip": flips[position],
               "canvas": canvas_sizes[canvases[i]], "boxes": boxes, "labels": labels,
               "box_mask": np.arange(max_boxes) < n}

  signature = {"index": tf.TensorSpec([], tf.int64), "new_size": tf.TensorSpec([2], tf.int32),
               "flip": tf.TensorSpec([], tf.bool), "canvas": tf.TensorSpec([2], tf.int32),
               "boxes": tf.TensorSpec([max_boxes, 4], tf.float32),
               "labels": tf.TensorSpec([max_boxes], tf.int32),
               "box_mask": tf.TensorSpec([max_boxes], tf.bool)}

  def load(example):
    image = transforms.prepare_image(split.reader.read(example["index"]), example["new_size"],
                                     example["flip"], example["canvas"])
    return {"image": image, "image_size": example["new_size"], "boxes": example["boxes"],
            "labels": example["labels"], "box_mask": example["box_mask"]}

  first_epoch, skip = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    ds = tf.data.Dataset.from_generator(
        functools.partial(examples, epoch, skip if epoch == first_epoch else 0),
        output_signature=signature)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())
    yield from _numpy_batches(ds, split.name)


def eval_iterator(config, *, process_index: int | None = None, process_count: int | None = None):
  """This process's eval batches: 'image', 'image_size', 'scale_factor' float32 [b, 2] (resized
  / stored width, height, mmdet's), 'image_id' int32 [b] and 'mask' bool [b]."""
  index, count = _process(process_index, process_count)
  split = open_split(config, config.eval_split)
  global_batch = config.eval_batch_size or config.batch_size
  local = _local_batch(global_batch, count, "eval_batch_size")
  short = min(config.image_scale)
  canvases = _canvases(config, split, short)
  canvas_sizes = np.asarray(config.canvas_sizes, np.int32).reshape(-1, 2)
  new_sizes = transforms.resized_sizes(split.sizes, max(config.image_scale), short)

  def examples():
    for canvas in np.unique(canvases):
      members = np.flatnonzero(canvases == canvas)
      rows = np.full(math.ceil(len(members) / global_batch) * global_batch, -1)
      rows[:len(members)] = members
      for batch in rows.reshape(-1, global_batch):
        for i in batch[index * local:(index + 1) * local]:
          size, new = split.sizes[max(i, 0)], new_sizes[max(i, 0)]
          yield {"index": max(i, 0), "new_size": new, "canvas": canvas_sizes[canvas],
                 "scale_factor": (new[::-1] / size[::-1]).astype(np.float32),
                 "image_id": np.int32(split.image_ids[i] if i >= 0 else -1), "mask": i >= 0}

  signature = {"index": tf.TensorSpec([], tf.int64), "new_size": tf.TensorSpec([2], tf.int32),
               "canvas": tf.TensorSpec([2], tf.int32),
               "scale_factor": tf.TensorSpec([2], tf.float32),
               "image_id": tf.TensorSpec([], tf.int32), "mask": tf.TensorSpec([], tf.bool)}

  def load(example):
    def real():
      return transforms.prepare_image(split.reader.read(example["index"]), example["new_size"],
                                      tf.constant(False), example["canvas"])

    def padding():
      return tf.zeros(tf.concat([example["canvas"], [3]], 0))

    image = tf.cond(example["mask"], real, padding)
    return {"image": image, "image_size": example["new_size"],
            "scale_factor": example["scale_factor"], "image_id": example["image_id"],
            "mask": example["mask"]}

  ds = tf.data.Dataset.from_generator(examples, output_signature=signature)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _numpy_batches(ds, split.name)
