"""tf.data pipelines for semantic segmentation: an exactly resumable train stream and exact,
statically shaped eval batches, per process.

Train: each process reads a disjoint shard (examples index, index + P, ...); epoch e visits it in
a permutation seeded by (seed, e, process), and the example at position i of the epoch is
augmented with a stateless seed folded from (seed, process, e, i). Resuming at step N skips the
first positions of epoch N // steps_per_epoch before reading anything.

Eval: whole-image inference as the official configs do it, with static shapes. Each image's
network input size (rescaled into config.seg.eval_scale, sides rounded up to multiples of 32)
and its label's original size are known from the file headers before decoding, so examples are
grouped into buckets of equal canvas shapes (the input size rounded up to
seg.eval_canvas_multiple, the label size to seg.eval_label_canvas_multiple) and every bucket is
one compiled program. With eval_canvas_multiple == size_divisor (the default) the network sees
each image at exactly its official size, unpadded where it matters (see `valid` masks below).
Within a bucket, examples are dealt round robin to the processes and padded to whole global
batches, so each example counts once (mask True on exactly one process) on any number of hosts.
"""

import dataclasses
import functools
import itertools
import math
import re

import numpy as np
import tensorflow as tf

from pvt_jax.data.errors import DatasetError
from pvt_jax.data.pipeline import _local_batch, _process  # shared with classification
from pvt_jax.data.segmentation import transforms
from pvt_jax.data.segmentation.sources import SegmentationSource, open_source
from pvt_jax.data.sources import IMAGE_MAGIC

_CORRUPT = "corrupt image file"
_MISMATCH = "label size differs from its image"
_DecodeError = tf.errors.InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class SegmentationInfo:
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  num_train_examples: int
  num_eval_examples: int
  train_split: str
  eval_split: str
  ignore_index: int = transforms.IGNORE_INDEX


def _eval_split(config, source: SegmentationSource) -> str:
  return source.resolve_split(config.eval_split, eval_default=True)


def dataset_info(config) -> SegmentationInfo:
  source = open_source(config)
  train_split, eval_split = source.resolve_split(config.train_split), _eval_split(config, source)
  return SegmentationInfo(source.name, source.num_classes, source.class_names,
                          len(source.split(train_split)), len(source.split(eval_split)),
                          train_split, eval_split)


def _decode(record, source: SegmentationSource):
  """(image float32 [H, W, 3] in [0, 255], label int32 [H, W]); label 0 -> 255 and k -> k - 1
  where the source reduces the zero label. Bytes that are no image, and labels whose size
  differs from their image's, fail with the file's name (reported by `_numpy_batches`)."""
  image, label = record["image"], record["label"]
  if source.encoded:
    checks = [tf.debugging.Assert(tf.reduce_any([tf.strings.substr(data, 0, len(m)) == m
                                                 for m in IMAGE_MAGIC]), [_CORRUPT, record["name"]])
              for data in (image, label)]
    with tf.control_dependencies(checks):
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
      label = tf.io.decode_png(label, channels=0)[:, :, 0]
  same = tf.reduce_all(tf.shape(image)[:2] == tf.shape(label))
  with tf.control_dependencies([tf.debugging.Assert(same, [_MISMATCH, record["name"]])]):
    label = tf.cast(label, tf.int32)
  if source.reduce_zero_label:
    label = transforms.reduce_zero_label(label)
  return tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32), label


def _numpy_batches(ds: tf.data.Dataset, what: str):
  """Iterates `ds` as numpy, turning decode and size failures into one-line DatasetErrors."""
  try:
    yield from ds.as_numpy_iterator()
  except _DecodeError as e:
    for problem in (_CORRUPT, _MISMATCH):
      match = re.search(re.escape(problem) + r"\]\s*\[b?['\"]?([^'\"\]]*)", e.message)
      if match:
        hint = "not a JPEG/PNG image" if problem == _CORRUPT else "it must match pixel for pixel"
        raise DatasetError(f"{what}: {problem} {match.group(1)} ({hint}); remove or replace "
                           f"it") from None
    first_line = e.message.strip().splitlines()[0]
    raise DatasetError(f"{what}: cannot decode an image: {first_line}") from None


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _epoch_order(shard: np.ndarray, length: int, seed: int, epoch: int, index: int):
  """`length` positions of the shard in epoch `epoch`'s order (whole permutations, repeated
  only when an epoch is longer than the shard)."""
  rng = np.random.default_rng([seed, epoch, index])
  rounds = math.ceil(length / len(shard))
  return np.concatenate([shard[rng.permutation(len(shard))] for _ in range(rounds)])[:length]


def train_iterator(config, start_step: int = 0, *, process_index: int | None = None,
                   process_count: int | None = None):
  """Infinite iterator of this process's batches {'image' float32 [B, S, S, 3] normalised,
  'label' int32 [B, S, S] (255: ignore)}, identical from `start_step` on to an uninterrupted
  run's. An epoch is num_train_examples // batch_size steps."""
  index, count = _process(process_index, process_count)
  source = open_source(config)
  train_split = source.resolve_split(config.train_split)
  seg = config.seg
  local_batch = _local_batch(config.batch_size, count, "batch_size")
  num_examples = len(source.split(train_split))
  shard = np.arange(index, num_examples, count)
  if not len(shard):
    raise DatasetError(f"{source.name}: split {train_split!r} has no examples for process "
                       f"{index} of {count}")
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  per_epoch = steps_per_epoch * local_batch
  base_seed = tf.constant([config.seed, index], tf.int64)
  augment = functools.partial(
      transforms.train_example, crop_size=tuple(seg.crop_size), scale=tuple(seg.scale),
      ratio_range=tuple(seg.ratio_range), cat_max_ratio=seg.cat_max_ratio,
      flip_probability=seg.flip_probability, photometric=seg.photometric)

  def example(epoch, position, record):
    seed = tf.random.experimental.stateless_fold_in(base_seed, epoch)
    seed = tf.random.experimental.stateless_fold_in(seed, position)
    image, label = augment(seed, *_decode(record, source))
    return {"image": image, "label": label}

  first_epoch, skip = divmod(start_step, steps_per_epoch)
  for epoch in itertools.count(first_epoch):
    start = skip * local_batch if epoch == first_epoch else 0
    order = _epoch_order(shard, per_epoch, config.seed, epoch, index)[start:]
    positions = tf.data.Dataset.range(start, per_epoch)
    ds = tf.data.Dataset.zip((positions, source.records(train_split, order)))
    ds = ds.map(functools.partial(example, epoch), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from _numpy_batches(ds.with_options(_options()), f"{source.name} {train_split}")


@dataclasses.dataclass(frozen=True)
class EvalBucket:
  """One eval program's shapes and which examples (split indices) it holds."""
  image_canvas: tuple[int, int]
  label_canvas: tuple[int, int]
  examples: np.ndarray

  def num_batches(self, local_batch: int, process_count: int) -> int:
    return math.ceil(math.ceil(len(self.examples) / process_count) / local_batch)


def _round_up(sizes: np.ndarray, multiple: int) -> np.ndarray:
  return -(-sizes // multiple) * multiple


@functools.lru_cache(maxsize=8)
def _eval_plan(source: SegmentationSource, split: str, scale, size_divisor, image_multiple,
               label_multiple):
  sizes = source.sizes(split)
  rescaled, aligned = transforms.eval_sizes(sizes[:, 0], sizes[:, 1], scale, size_divisor)
  image_canvas = _round_up(aligned, image_multiple)
  label_canvas = _round_up(sizes, label_multiple)
  keys = np.concatenate([image_canvas, label_canvas], axis=1)
  buckets = [EvalBucket(tuple(map(int, key[:2])), tuple(map(int, key[2:])),
                        np.flatnonzero((keys == key).all(axis=1)))
             for key in np.unique(keys, axis=0)]
  return sizes, rescaled, aligned, buckets


def eval_plan(config):
  """(original sizes [N, 2], rescaled [N, 2], network input sizes [N, 2], buckets) of the eval
  split; buckets in the order `eval_iterator` yields them."""
  source = open_source(config)
  eval_split = _eval_split(config, source)
  seg = config.seg
  if seg.eval_canvas_multiple % seg.size_divisor:
    raise DatasetError(f"seg.eval_canvas_multiple={seg.eval_canvas_multiple} must be a multiple "
                       f"of seg.size_divisor={seg.size_divisor}")
  return _eval_plan(source, eval_split, tuple(seg.eval_scale), seg.size_divisor,
                    seg.eval_canvas_multiple, seg.eval_label_canvas_multiple)


def eval_iterator(config, *, process_index: int | None = None,
                  process_count: int | None = None):
  """This process's eval batches, bucket after bucket (shapes are constant within one):
  {'image' float32 [B, Hc, Wc, 3] (the resized image top-left, 0 elsewhere), 'image_size' int32
  [B, 2] (its size), 'label' int32 [B, Lh, Lw] (the original label top-left, 255 elsewhere),
  'label_size' int32 [B, 2], 'mask' bool [B]}."""
  index, count = _process(process_index, process_count)
  source = open_source(config)
  eval_split = _eval_split(config, source)
  local_batch = _local_batch(config.eval_batch_size or config.batch_size, count,
                             "eval_batch_size")
  sizes, rescaled, aligned, buckets = eval_plan(config)

  def prepare(record, rescaled, aligned, original, image_canvas, label_canvas):
    image, label = _decode(record, source)
    image = transforms.eval_image(image, (rescaled[0], rescaled[1]), (aligned[0], aligned[1]))
    image = tf.pad(image, [[0, image_canvas[0] - aligned[0]], [0, image_canvas[1] - aligned[1]],
                           [0, 0]])
    label = tf.pad(label, [[0, label_canvas[0] - original[0]],
                           [0, label_canvas[1] - original[1]]],
                   constant_values=transforms.IGNORE_INDEX)
    return {"image": tf.ensure_shape(image, [*image_canvas, 3]), "image_size": aligned,
            "label": tf.ensure_shape(label, label_canvas), "label_size": original,
            "mask": tf.constant(True)}

  def bucket_batches(bucket: EvalBucket):
    mine = bucket.examples[index::count]
    padding = bucket.num_batches(local_batch, count) * local_batch - len(mine)
    # Padding examples: no pixels to score (labels all 255), sizes of the canvas.
    pad = {"image": tf.zeros([*bucket.image_canvas, 3]),
           "image_size": tf.constant(bucket.image_canvas, tf.int32),
           "label": tf.fill(bucket.label_canvas, transforms.IGNORE_INDEX),
           "label_size": tf.constant(bucket.label_canvas, tf.int32), "mask": tf.constant(False)}
    ds = tf.data.Dataset.from_tensors(pad).repeat(padding)
    if len(mine):
      per_example = [tf.data.Dataset.from_tensor_slices(a[mine].astype(np.int32))
                     for a in (rescaled, aligned, sizes)]
      real = tf.data.Dataset.zip((source.records(eval_split, mine), *per_example)).map(
          functools.partial(prepare, image_canvas=bucket.image_canvas,
                            label_canvas=bucket.label_canvas),
          num_parallel_calls=tf.data.AUTOTUNE)
      ds = real.concatenate(ds)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _numpy_batches(ds.with_options(_options()), f"{source.name} {eval_split}")

  for bucket in buckets:
    yield from bucket_batches(bucket)
