"""Where segmentation examples come from: config.dataset -> image/label records.

  "fashion_mnist_seg"  the offline set of synthetic.py (Fashion-MNIST items on a canvas),
                       splits train / validation, 11 classes (background + 10 garments).
  "ade20k:/root"       ADE20K's release layout, root = ADEChallengeData2016:
                       root/images/{training,validation}/*.jpg and
                       root/annotations/{training,validation}/*.png; 150 classes, label 0
                       ("other") ignored (mmseg's reduce_zero_label).
  "folder:/root"       your own data in the same layout: root/images/<split>/<name>.jpg|png and
                       root/annotations/<split>/<name>.png (8-bit class indices, 255 ignored);
                       config.num_classes classes, config.reduce_zero_label as for ADE20K.
  "scene_parse150"     tfds' builder. NOTE: it reads Places Challenge 2017's
                       `annotations_instance` (R channel = class of its 100 instance categories,
                       G = instance), not the 150-class scene-parsing masks of the paper's Table 5;
                       labels are the R channel, 0 ignored, 100 classes. Use "ade20k:" for the
                       paper's benchmark.

Every source gives a split's records {'image', 'label', 'name'} by index
(`records(split, indices)`, so each process reads only its own examples), either encoded (file
bytes, decoded in the pipeline's parallel map, where corrupt files are reported by name) or as
uint8 arrays. Of a multi-channel label PNG the first channel is the class.
"""

import dataclasses
import functools
import io
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from pvt_jax.data.errors import DatasetError
from pvt_jax.data.segmentation import synthetic

ADE20K_PREFIX = "ade20k:"
FOLDER_PREFIX = "folder:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split's examples: names, and either file paths or in-memory data."""
  names: tuple[str, ...]
  image_files: tuple[str, ...] | None = None
  label_files: tuple[str, ...] | None = None
  images: np.ndarray | list | None = None  # uint8 [N, H, W, 3], or encoded bytes per example
  labels: np.ndarray | list | None = None

  def __len__(self) -> int:
    return len(self.names)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (cached per process)
class SegmentationSource:
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  reduce_zero_label: bool
  encoded: bool  # records hold file bytes (decoded in the pipeline) or uint8 arrays
  splits: dict  # split name -> Split

  def split(self, split: str) -> Split:
    if split not in self.splits:
      raise DatasetError(f"{self.name} has no split {split!r} (splits: "
                         f"{', '.join(self.splits)})")
    return self.splits[split]

  def resolve_split(self, split: str, *, eval_default: bool = False) -> str:
    if not split and eval_default:
      for candidate in ("validation", "val", "test"):
        if candidate in self.splits:
          return candidate
      raise DatasetError(f"{self.name} has no validation, val or test split (splits: "
                         f"{', '.join(self.splits)}); set config.eval_split")
    self.split(split)
    return split

  def records(self, split: str, indices) -> tf.data.Dataset:
    """{'image', 'label', 'name'} of the examples `indices` of `split`, in that order."""
    data = self.split(split)
    indices = np.asarray(indices, np.int64)
    names = tf.data.Dataset.from_tensor_slices(np.asarray(data.names, object)[indices]
                                               .astype(str))
    if data.image_files is not None:
      images = tf.data.Dataset.from_tensor_slices(
          np.asarray(data.image_files, object)[indices].astype(str)).map(tf.io.read_file)
      labels = tf.data.Dataset.from_tensor_slices(
          np.asarray(data.label_files, object)[indices].astype(str)).map(tf.io.read_file)
    elif self.encoded:
      images = tf.data.Dataset.from_tensor_slices([data.images[i] for i in indices])
      labels = tf.data.Dataset.from_tensor_slices([data.labels[i] for i in indices])
    else:
      images = tf.data.Dataset.from_tensor_slices(data.images[indices])
      labels = tf.data.Dataset.from_tensor_slices(data.labels[indices])
    return tf.data.Dataset.zip({"image": images, "label": labels, "name": names})

  def sizes(self, split: str) -> np.ndarray:
    """int [N, 2]: every example's (height, width), read from file headers (no decoding); a
    label whose size differs from its image's is a DatasetError naming the file."""
    return _sizes(self, split)


@functools.lru_cache(maxsize=16)
def _sizes(source: SegmentationSource, split: str) -> np.ndarray:
  data = source.split(split)
  if not source.encoded:
    return np.tile(np.asarray(data.images.shape[1:3]), (len(data), 1))
  sizes = np.empty((len(data), 2), np.int64)
  for i in range(len(data)):
    if data.image_files is not None:
      image, label = data.image_files[i], data.label_files[i]
    else:
      image, label = io.BytesIO(data.images[i]), io.BytesIO(data.labels[i])
    image_size, _ = _header(image, data.names[i])
    label_size, mode = _header(label, data.names[i])
    if mode == "P":
      raise DatasetError(f"{source.name}: the label of {data.names[i]} is a palette PNG; "
                         f"save class indices as 8-bit greyscale (PIL: "
                         f"Image.fromarray(np.asarray(png)).save(...))")
    if image_size != label_size:
      raise DatasetError(f"{source.name}: the label of {data.names[i]} is "
                         f"{label_size[1]}x{label_size[0]}, its image "
                         f"{image_size[1]}x{image_size[0]} (width x height)")
    sizes[i] = image_size
  return sizes


def _header(file, name: str) -> tuple[tuple[int, int], str]:
  """((height, width), PIL mode) from an image file's header."""
  try:
    with Image.open(file) as image:
      return (image.height, image.width), image.mode
  except (OSError, ValueError):  # PIL.UnidentifiedImageError is an OSError
    raise DatasetError(f"corrupt image file {name} (not a JPEG/PNG image); remove or "
                       f"replace it") from None


@functools.lru_cache(maxsize=8)
def _cached(dataset: str, num_classes: int, reduce_zero_label: bool, data_dir, fashion_dir,
            synthetic_key) -> SegmentationSource:
  if dataset == "fashion_mnist_seg":
    return _fashion_mnist_seg(fashion_dir, *synthetic_key)
  if dataset.startswith(ADE20K_PREFIX):
    return _folder(dataset[len(ADE20K_PREFIX):], "ade20k", len(ADE20K_CLASSES), ADE20K_CLASSES,
                   reduce_zero_label=True)
  if dataset.startswith(FOLDER_PREFIX):
    if num_classes <= 0:
      raise DatasetError(f"{dataset}: set config.num_classes (a folder's labels do not say "
                         f"how many classes there are)")
    names = tuple(f"class {i}" for i in range(num_classes))
    return _folder(dataset[len(FOLDER_PREFIX):], dataset, num_classes, names,
                   reduce_zero_label)
  if dataset == "scene_parse150":
    return _scene_parse150(data_dir)
  raise DatasetError(f"unknown segmentation dataset {dataset!r}: use 'fashion_mnist_seg', "
                     f"'ade20k:/path/to/ADEChallengeData2016', 'folder:/path' or "
                     f"'scene_parse150'")


def open_source(config) -> SegmentationSource:
  """The source named by config.dataset (opened once per process)."""
  seg = config.seg
  return _cached(config.dataset, config.num_classes, seg.reduce_zero_label, config.data_dir,
                 config.fashion_mnist_dir,
                 (seg.synthetic.canvas_size, seg.synthetic.num_train, seg.synthetic.num_eval,
                  seg.synthetic.seed))


def _fashion_mnist_seg(directory: str, size: int, num_train: int, num_eval: int,
                       seed: int) -> SegmentationSource:
  splits = {}
  for split, count in (("train", num_train), ("validation", num_eval)):
    images, labels = synthetic.build(directory, split, count, size, seed)
    splits[split] = Split(tuple(f"fashion_mnist_seg/{split}/{i}" for i in range(count)),
                          images=images, labels=labels)
  return SegmentationSource("fashion_mnist_seg", len(synthetic.CLASS_NAMES),
                            synthetic.CLASS_NAMES, reduce_zero_label=False, encoded=False,
                            splits=splits)


def _folder(root: str, name: str, num_classes: int, class_names, reduce_zero_label: bool):
  images_dir, labels_dir = os.path.join(root, "images"), os.path.join(root, "annotations")
  if not (os.path.isdir(images_dir) and os.path.isdir(labels_dir)):
    raise DatasetError(f"{name}: {root} needs images/<split>/*.jpg and "
                       f"annotations/<split>/*.png")
  splits = {}
  for split in sorted(os.listdir(images_dir)):
    split_dir = os.path.join(images_dir, split)
    if not os.path.isdir(split_dir):
      continue
    files = sorted(f for f in os.listdir(split_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    image_files, label_files = [], []
    for file in files:
      label = os.path.join(labels_dir, split, os.path.splitext(file)[0] + ".png")
      if not os.path.isfile(label):
        raise DatasetError(f"{name}: no annotation for {os.path.join(split_dir, file)} "
                           f"(expected {label})")
      image_files.append(os.path.join(split_dir, file))
      label_files.append(label)
    if image_files:
      splits[split] = Split(tuple(image_files), tuple(image_files), tuple(label_files))
  if not splits:
    raise DatasetError(f"{name}: no images in {images_dir}/<split>/ (.jpg, .jpeg or .png)")
  return SegmentationSource(name, num_classes, tuple(class_names), reduce_zero_label,
                            encoded=True, splits=splits)


def _scene_parse150(data_dir) -> SegmentationSource:
  import tensorflow_datasets as tfds

  builder = tfds.builder("scene_parse150", data_dir=data_dir)
  if not builder.is_prepared():
    raise DatasetError("scene_parse150 is not prepared in the tfds data dir; prepare it with "
                       "tfds (it downloads ~1 GB), or use 'ade20k:/path/to/ADEChallengeData2016'")
  decoders = {"image": tfds.decode.SkipDecoding(), "annotation": tfds.decode.SkipDecoding()}
  splits = {}
  for split in builder.info.splits:
    ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    images, labels = [], []
    for example in ds.as_numpy_iterator():
      images.append(example["image"])
      labels.append(example["annotation"])
    names = tuple(f"scene_parse150/{split}/{i}" for i in range(len(images)))
    splits[split] = Split(names, images=images, labels=labels)
  return SegmentationSource("scene_parse150", 100, tuple(f"category {i + 1}" for i in range(100)),
                            reduce_zero_label=True, encoded=True, splits=splits)
