"""tf.data input pipelines: per-process train stream (exactly resumable) and exact eval batches.

Determinism: every random choice is a stateless function of (config.seed, epoch, position in the
epoch's global stream), and all tf.data stages run in deterministic order. Each epoch's record
order comes from a shuffle seeded by (seed, epoch) alone, the same on every process, and step s
is positions [s * B, (s + 1) * B) of it (B the global batch), each process decoding its slice:
the global batch of step s is the same examples, augmented the same way, however many processes
share it (the batch-level augmentation runs on the global batch in the train step). Resuming at
step N starts the epoch N // steps_per_epoch and skips the first positions of it *before*
decoding: skipping costs reading records, never decoding or augmenting them.
"""

import dataclasses
import functools
import itertools
import math
import re
import time

import jax
import numpy as np
import tensorflow as tf

from pvt_jax.data import augment, randaugment
from pvt_jax.data.errors import DatasetError, tf_reason
from pvt_jax.data.sources import IMAGE_MAGIC, Source, open_source

_CORRUPT = "corrupt image file"
# A tf.data pipeline runs whole epochs, enough for this many steps, but at most this many epochs
# (each epoch adds its record datasets to the pipeline's graph).
_PIPELINE_STEPS = 500
_PIPELINE_EPOCHS = 16
# Bound at import: the except clause below can run at interpreter exit, when `tf` may be gone.
_DecodeError = tf.errors.InvalidArgumentError


def _keep_tf_off_accelerators() -> None:
  """tf.data must not grab GPU memory that JAX needs (tensorflow-cpu has none; full TF might)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices; nothing we can change now.
    pass


_keep_tf_off_accelerators()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  train_split: str
  eval_split: str


@functools.lru_cache(maxsize=8)
def _cached_source(dataset, data_dir, manual_dir, fashion_mnist_dir, check_data) -> Source:
  """Opened once per process: an ImageFolder lists (and checks) its whole tree when opened."""
  return open_source({"dataset": dataset, "data_dir": data_dir, "manual_dir": manual_dir,
                      "fashion_mnist_dir": fashion_mnist_dir, "check_data": check_data})


def _source(config) -> Source:
  return _cached_source(config.get("dataset", "fashion_mnist"), config.get("data_dir", None),
                        config.get("manual_dir", None),
                        config.get("fashion_mnist_dir", "/usr/share/datasets/fashion-mnist"),
                        config.get("check_data", True))


def _splits(config, source: Source) -> tuple[str, str]:
  return (source.resolve_split(config.get("train_split", "train")),
          source.resolve_split(config.get("eval_split", ""), eval_default=True))


def dataset_info(config) -> DatasetInfo:
  """Class count and split sizes of config.dataset (prepares it on first use)."""
  source = _source(config)
  train_split, eval_split = _splits(config, source)
  return DatasetInfo(source.name, source.num_classes, source.num_examples(train_split),
                     source.num_examples(eval_split), train_split, eval_split)


def _process(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return index, count


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise DatasetError(f"{what}={global_batch} must be a positive multiple of the process "
                       f"count {process_count}")
  return global_batch // process_count


def _decode(record, source: Source, crop_box=None):
  """float32 [H, W, 3] in [0, 255]; raises (naming the file) on bytes that are no image.

  `crop_box(height, width) -> (top, left, h, w)` crops while decoding; JPEGs then decode only
  the crop window (tf.image.decode_and_crop_jpeg), which is most of the decode cost saved for
  RandomResizedCrop on ImageNet. Its pixels equal decode-then-crop except the window's last
  column (libjpeg's chroma upsampling lacks the right neighbour there): a negligible change.
  """
  image = record["image"]
  if not source.encoded:
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    return tf.cast(_crop(image, crop_box), tf.float32)
  known = tf.reduce_any([tf.equal(tf.strings.substr(image, 0, len(m)), m) for m in IMAGE_MAGIC])
  check = tf.debugging.Assert(known, [_CORRUPT, record["name"]])
  with tf.control_dependencies([check]):
    encoded = tf.identity(image)

  def any_format():
    decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return _crop(decoded, crop_box)

  def jpeg_window():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = tf.stack(crop_box(shape[0], shape[1]))
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  if crop_box is None:
    image = any_format()
  else:
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), IMAGE_MAGIC[0])
    image = tf.cond(is_jpeg, jpeg_window, any_format)
  return tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32)


def _crop(image, crop_box):
  if crop_box is None:
    return image
  top, left, height, width = crop_box(tf.shape(image)[0], tf.shape(image)[1])
  return image[top:top + height, left:left + width]


def _aug(config, name, default):
  aug = config.get("aug", None)
  return aug.get(name, default) if aug is not None else default


def _options() -> tf.data.Options:
  """tf.data options of the train and eval pipelines, each chosen for a reason."""
  options = tf.data.Options()
  # Outputs in input order: the stream is a function of (seed, epoch, position) only, which
  # exact resume needs; the parallel map still runs out of order internally.
  options.deterministic = True
  # Parallelism comes from images in flight (the parallel map's degree, autotuned, the default):
  # one thread per op inside an image avoids oversubscribing the cores with both.
  options.threading.max_intra_op_parallelism = 1
  # The static rewrites (map/batch fusion, injected prefetches, ...) run again for every
  # epoch's pipeline and cost ~0.35 s of CPU each time here, for nothing: the pipelines are
  # written in their rewritten form already (parallel map, batch, prefetch).
  options.experimental_optimization.apply_default_optimizations = False
  # No private thread pool: this process runs no other TensorFlow work, so TF's shared
  # inter-op pool is tf.data's alone and already sized to the cores.
  return options


def _int_seed(*parts: int) -> int:
  """A tf.data shuffle seed from integers (seed, epoch, process)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint32)[0])


def _numpy_batches(ds: tf.data.Dataset, what: str, batch_records):
  """Iterates `ds` as numpy, turning decode failures into one-line DatasetErrors.

  `batch_records(b)` are the (undecoded) records of batch b: TensorFlow's decoders do not say
  which file they failed on (a truncated JPEG gives "jpeg::Uncompress failed"), so the records
  of the failing batch are decoded again one by one to name it.
  """
  yielded = 0
  try:
    for batch in ds.as_numpy_iterator():
      yield batch
      yielded += 1
  except _DecodeError as e:
    match = re.search(_CORRUPT + r"\]\s*\[b?['\"]?([^'\"\]]*)", e.message)
    if match:
      raise DatasetError(f"{what}: {_CORRUPT} {match.group(1)} (not a JPEG/PNG/GIF/BMP/WebP "
                         f"image); remove or replace it") from None
    first_line = tf_reason(e.message)
    name = _undecodable(batch_records(yielded))
    if name:
      raise DatasetError(f"{what}: cannot decode {name} ({first_line}); remove or replace "
                         f"it") from None
    raise DatasetError(f"{what}: cannot decode an image: {first_line}") from None


def _undecodable(records: tf.data.Dataset) -> str | None:
  """The name of the first record whose image TensorFlow cannot decode, if any."""
  for record in records:
    try:
      tf.io.decode_image(record["image"], channels=3, expand_animations=False)
    except _DecodeError:
      return record["name"].numpy().decode() or "an unnamed record"
  return None


def _train_example_fn(config, source: Source, base_seed):
  """record with 'epoch' and 'pos' -> {'image' uint8 [S, S, 3], 'label'}: the per-image part of
  the recipe (crop, flip, RandAugment); the batch-level rest runs in the train step
  (pvt_jax/data/batch_augment.py). A tf.function, traced once: every epoch's pipeline calls the
  same graph (tracing RandAugment's 15 branches anew took seconds per epoch)."""
  size = config.get("image_size", 224)
  crop_pct = config.get("crop_pct", 0.875)
  rrc = _aug(config, "random_resized_crop", True)
  scale = tuple(_aug(config, "crop_scale", (0.08, 1.0)))
  ratio = tuple(_aug(config, "crop_ratio", (0.75, 4 / 3)))
  hflip = _aug(config, "hflip", True)
  ra_name = _aug(config, "randaugment", "rand-m9-mstd0.5-inc1")
  ra_spec = randaugment.parse(ra_name) if ra_name else None

  @tf.function
  def fn(record):
    seed = tf.random.experimental.stateless_fold_in(base_seed, record["epoch"])
    seed = tf.random.experimental.stateless_fold_in(seed, record["pos"])
    s_crop, s_flip, s_ra = augment.split_seed(seed, 3)
    if rrc:
      image = _decode(record, source, functools.partial(
          augment.random_resized_crop_box, s_crop, scale=scale, ratio=ratio))
      image = augment.resize(image, size, size)
    else:
      image = augment.resize_center_crop(_decode(record, source), size, crop_pct)
    if hflip:
      image = augment.random_flip(image, s_flip)
    if ra_spec is not None:
      image = randaugment.rand_augment(image, s_ra, ra_spec)
    return {"image": tf.ensure_shape(tf.cast(image, tf.uint8), [size, size, 3]),
            "label": record["label"]}

  return fn


def train_iterator(config, start_step: int = 0, *, process_index: int | None = None,
                   process_count: int | None = None):
  """Infinite iterator of this process's batches, identical from step `start_step` on to the
  stream of an uninterrupted run: {'image' uint8 [B, S, S, 3], 'label' int32 [B]} (the
  classification task's train step normalises, erases and mixes them).

  Process i of P yields rows [i * B, (i + 1) * B) of each global batch (B = batch_size / P),
  the rows its devices hold in the global array (sharding.global_batch). Every process reads the
  whole split in the same order and decodes only its rows. Epochs have
  num_train_examples // batch_size steps. With repeated augmentation x R, an epoch takes 1 / R of
  its (shuffled) records and shows each R times, at consecutive positions and with different
  augmentations (DeiT's RASampler puts the R copies into the same global batch too); the epoch
  length is unchanged.
  """
  index, count = _process(process_index, process_count)
  source = _source(config)
  train_split, _ = _splits(config, source)
  global_batch = config.get("batch_size", 1024)
  local_batch = _local_batch(global_batch, count, "batch_size")
  num_examples = source.num_examples(train_split)
  steps_per_epoch = max(num_examples // global_batch, 1)
  per_epoch = steps_per_epoch * global_batch
  lo, hi = index * local_batch, (index + 1) * local_batch  # this process's rows of a batch
  repeats = max(int(_aug(config, "repeated_aug", 3)), 1)
  seed = config.get("seed", 0)
  cache = config.get("cache", False)
  shard = source.read(train_split)
  shard_size = int(shard.cardinality())
  if shard_size <= 0:
    raise DatasetError(f"{source.name}: split {train_split!r} has no examples")
  if cache:
    shard = shard.cache()
    # Fill the in-memory cache with one full pass now. Left to the epoch pipelines, a pass that
    # stops early (a run ending mid-epoch, a shuffle that never reaches the shard's end) makes
    # tf.data discard the partial cache, read the files again and warn.
    shard.reduce(np.int64(0), lambda count, _: count + 1)
  # Repeated augmentation shows only the first 1 / R of each epoch's records: from a cached
  # shard shuffle fully so that this subset is uniform, else use the configured buffer.
  buffer = (shard_size if cache and repeats > 1
            else min(config.get("shuffle_buffer", 50_000), shard_size))
  # Seeds and shuffles take no process index: they are those of process 0 of 1.
  example_fn = _train_example_fn(config, source, tf.constant([seed, 0], tf.int64))
  options = _options()
  first_epoch, skip = divmod(start_step, steps_per_epoch)

  def epoch_records(epoch: int, skip_steps: int):
    records = shard if cache else source.read(train_split,
                                              shuffle_seed=_int_seed(seed, epoch, 0))
    records = records.shuffle(buffer, seed=_int_seed(seed, epoch, 0, 1),
                              reshuffle_each_iteration=True).repeat()
    records = records.take(math.ceil(per_epoch / repeats)).enumerate()
    # Each record `repeats` times in a row (a map and unbatch: cheaper per record than a
    # flat_map, which makes a dataset for each).
    records = records.map(lambda i, r: {
        **{k: tf.repeat(v[None], repeats, axis=0) for k, v in r.items()},
        "pos": i * repeats + tf.range(repeats, dtype=tf.int64),
        "epoch": tf.fill([repeats], tf.constant(epoch, tf.int64))}).unbatch()
    records = records.take(per_epoch).skip(skip_steps * global_batch)
    return records.filter(lambda r: (r["pos"] % global_batch >= lo)
                          & (r["pos"] % global_batch < hi))

  def pipeline_records(epochs: range, skip_steps: int):
    # Epochs hold whole batches, so one pipeline can run several: its start-up (instantiating
    # the per-image graph, filling the buffers: ~0.6 s of CPU) then comes once per
    # _PIPELINE_STEPS steps (or _PIPELINE_EPOCHS epochs), not once per epoch of a small dataset.
    records = epoch_records(epochs[0], skip_steps)
    for epoch in epochs[1:]:
      records = records.concatenate(epoch_records(epoch, 0))
    return records

  def batches(records):
    ds = records.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

  epochs_per_pipeline = min(math.ceil(_PIPELINE_STEPS / steps_per_epoch), _PIPELINE_EPOCHS)
  for epoch in itertools.count(first_epoch, epochs_per_pipeline):
    records = pipeline_records(range(epoch, epoch + epochs_per_pipeline),
                               skip if epoch == first_epoch else 0)
    yield from _numpy_batches(
        batches(records), f"{source.name} {train_split}",
        lambda b, records=records: records.skip(b * local_batch).take(local_batch))


def eval_iterator(config, *, process_index: int | None = None,
                  process_count: int | None = None):
  """This process's eval batches {'image' uint8, 'label' int32, 'mask' bool}, padded to whole global
  batches: every process yields ceil(ceil(N / P) / local_batch) batches and each of the N
  examples has mask True on exactly one process."""
  index, count = _process(process_index, process_count)
  source = _source(config)
  _, eval_split = _splits(config, source)
  local_batch = _local_batch(config.get("eval_batch_size", 0) or config.get("batch_size", 1024),
                             count, "eval_batch_size")
  size = config.get("image_size", 224)
  crop_pct = config.get("crop_pct", 0.875)
  total = source.num_examples(eval_split)
  num_batches = math.ceil(math.ceil(total / count) / local_batch)
  shard = source.read(eval_split, index, count)
  padding = num_batches * local_batch - int(shard.cardinality())

  def prepare(record):
    image = augment.resize_center_crop(_decode(record, source), size, crop_pct)
    return {"image": tf.cast(image, tf.uint8), "label": record["label"],
            "mask": tf.constant(True)}

  ds = shard.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  pad = {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int32),
         "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(ds.with_options(_options()), f"{source.name} {eval_split}",
                        lambda b: shard.skip(b * local_batch).take(local_batch))


def measure_throughput(config, num_batches: int = 20, warmup_batches: int = 2) -> float:
  """Training-pipeline images per second on this process (after `warmup_batches`)."""
  batches = train_iterator(config)
  for _ in range(warmup_batches):
    next(batches)
  start = time.perf_counter()
  images = sum(len(next(batches)["image"]) for _ in range(num_batches))
  return images / (time.perf_counter() - start)
