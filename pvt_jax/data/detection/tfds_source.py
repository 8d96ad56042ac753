"""tfds detection datasets with `coco/2017`'s features (`image`, `image/id`, `objects/bbox`
normalised ymin xmin ymax xmax, `objects/label`, optionally `objects/is_crowd` and
`objects/area`) through a random-access data source: the detection pipeline reads images in the
order its schedule chooses, which tfds allows for datasets stored as ArrayRecord. Labels named
as COCO 2017's 80 categories keep COCO's category ids (for evaluation against COCO's own json
too); other datasets number their categories 1..K.

The index (image sizes from the JPEG headers, boxes) takes one pass over the split's records
and is cached beside the prepared dataset, so later runs start at once.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from pvt_jax.data.detection.coco import COCO_CATEGORIES
from pvt_jax.data.detection.index import BoxCleaner, DetectionSplit, coco_ground_truth
from pvt_jax.data.detection.readers import DataSourceReader
from pvt_jax.data.errors import DatasetError


def _open_source(name: str, split: str, data_dir):
  where = data_dir or "the default data dir"
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetError(f"unknown tfds dataset {name!r}") from None
  except AssertionError as error:  # tfds asserts the prepared files exist when download=False
    raise DatasetError(f"tfds {name} is not prepared in {where} ({error})") from None
  except (ValueError, NotImplementedError) as error:
    first = str(error).strip().splitlines()[0]
    raise DatasetError(f"tfds {name} split {split!r} in {where} cannot be read by index "
                       f"({first}); prepare it with `tfds build {name} "
                       f"--file_format=array_record` or convert a tfrecord copy with `tfds "
                       f"convert_format`") from None


def _index(source, cache_path):
  """(image ids, sizes, per image (normalised boxes, labels, crowd, area)), cached in an npz."""
  if os.path.isfile(cache_path):
    with np.load(cache_path) as data:
      cuts = np.cumsum(data["counts"])[:-1]
      parts = [np.split(data[k], cuts) for k in ("boxes", "labels", "crowd", "area")]
      return data["ids"], data["sizes"], list(zip(*parts, strict=True))

  def read(i):
    record = source[int(i)]
    objects = record["objects"]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    crowd = objects.get("is_crowd", np.zeros(len(boxes), bool))
    area = objects.get("area", np.full(len(boxes), np.nan))  # nan: the box area, once sized
    return (record["image"], np.int64(record.get("image/id", int(i) + 1)), boxes,
            np.asarray(objects["label"], np.int64), np.asarray(crowd, bool),
            np.asarray(area, np.float64))

  def shape_of(i):
    encoded, image_id, boxes, labels, crowd, area = tf.numpy_function(
        read, [i], (tf.string, tf.int64, tf.float32, tf.int64, tf.bool, tf.float64),
        stateful=False)
    encoded = tf.reshape(encoded, [])
    size = tf.cond(tf.io.is_jpeg(encoded),  # JPEGs: the header alone; others: decoded
                   lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                   lambda: tf.shape(tf.io.decode_image(encoded, expand_animations=False))[:2])
    return image_id, size, boxes, labels, crowd, area

  ds = tf.data.Dataset.range(len(source)).map(shape_of, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True)
  ids, sizes, objects = [], [], []
  for image_id, size, *rest in ds.as_numpy_iterator():
    ids.append(image_id)
    sizes.append(size)
    objects.append(tuple(rest))
  ids, sizes = np.array(ids, np.int64), np.array(sizes, np.int32).reshape(-1, 2)
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    partial = cache_path + ".partial.npz"
    np.savez(partial, ids=ids, sizes=sizes, counts=np.array([len(o[1]) for o in objects]),
             **{k: np.concatenate([o[j] for o in objects])
                for j, k in enumerate(("boxes", "labels", "crowd", "area"))})
    os.replace(partial, cache_path)
  except OSError as error:  # a read-only data dir: index again next time
    logging.warning("cannot cache the detection index at %s (%s)", cache_path, error)
  return ids, sizes, objects


def open_tfds_split(name: str, split: str, data_dir=None) -> DetectionSplit:
  source = _open_source(name, split, data_dir)
  info = source.dataset_info
  names = tuple(info.features["objects"]["label"].names)
  coco_names = tuple(n for _, n in COCO_CATEGORIES)
  if names in (coco_names, tuple(str(i) for i in range(len(coco_names)))):
    class_names, category_ids = coco_names, tuple(c for c, _ in COCO_CATEGORIES)
  else:
    class_names, category_ids = names, tuple(range(1, len(names) + 1))
  key = hashlib.sha256(f"{info.data_dir}:{split}:{len(source)}".encode()).hexdigest()[:12]
  cache = os.path.join(info.data_dir, "pvt_jax_index", f"{split}-{key}.npz")
  ids, sizes, objects = _index(source, cache)
  name = f"tfds {name} {split}"
  cleaner = BoxCleaner(name, category_ids)
  boxes, labels, annotations = [], [], []
  for (height, width), (norm, label, crowd, area) in zip(sizes, objects, strict=True):
    xyxy = norm[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
    cats = np.array(category_ids)[label] if len(label) else np.zeros(0, np.int64)
    area = np.where(np.isnan(area), xywh[:, 2] * xywh[:, 3], area)
    b, lab = cleaner(xywh, cats, crowd, area, int(height), int(width))
    boxes.append(b)
    labels.append(lab)
    annotations.append((xywh, cats, crowd, area))
  cleaner.report()
  truth = coco_ground_truth(name, class_names, category_ids, ids, sizes, annotations)
  return DetectionSplit(name, class_names, category_ids, ids, sizes, tuple(boxes), tuple(labels),
                        truth, DataSourceReader(source))
