"""Where examples come from: config.dataset -> a tfds builder, its splits and how to read them.

Three kinds of source, all through tensorflow-datasets:
  "fashion_mnist"   our offline builder over local idx files (fashion_mnist.py);
  "folder:/root"    tfds ImageFolder over root/<split>/<class>/*.jpg|png;
  any other name    a tfds builder ("imagenet2012" is prepared from the manual tars).
Every source yields {'image', 'label', 'name'} records; 'image' is still encoded (bytes) unless
`Source.encoded` is False (Fashion-MNIST stores raw uint8 pixels), so decoding happens in the
parallel map of the input pipeline, where corrupt files can be reported (see pipeline.py).
"""

import contextlib
import dataclasses
import fcntl
import os

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from pvt_jax.data import fashion_mnist
from pvt_jax.data.errors import DatasetError, tf_reason

FOLDER_PREFIX = "folder:"
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what tfds ImageFolder reads
# Leading bytes of the formats tf.io.decode_image reads.
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")
_TAIL = 4096  # bytes at a file's end searched for its format's end marker


@dataclasses.dataclass(frozen=True)
class Source:
  """A prepared dataset: its builder, the keys of its features and how to shard it."""
  name: str
  builder: tfds.core.DatasetBuilder
  image_key: str
  label_key: str
  name_key: str | None  # feature naming the file of an example, for error messages
  encoded: bool  # image is encoded bytes (decode in the pipeline) or raw uint8 pixels
  num_classes: int
  splits_by_slicing: bool  # tfds sub-split API available (per-process reads skip other shards)

  def resolve_split(self, split: str, *, eval_default: bool = False) -> str:
    """`split` checked against the builder's splits ("" -> validation, val or test, for eval)."""
    available = list(self.builder.info.splits.keys())
    if not split and eval_default:
      for candidate in ("validation", "val", "test"):
        if candidate in available:
          return candidate
      raise DatasetError(f"{self.name} has no validation, val or test split "
                         f"(splits: {', '.join(available)}); set config.eval_split")
    base = split.split("[", 1)[0]
    if available and base not in available:
      raise DatasetError(f"{self.name} has no split {base!r} (splits: {', '.join(available)})")
    return split

  def read(self, split: str, process_index: int = 0, process_count: int = 1, *,
           shuffle_seed: int | None = None) -> tf.data.Dataset:
    """This process's disjoint part of `split`, in a deterministic order.

    With `shuffle_seed` the file order is shuffled by that seed (the pipeline shuffles records).
    """
    decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options,
                                  try_autocache=False)
    # Ordered builders (Fashion-MNIST, a single file) keep their file order.
    shuffle_files = (shuffle_seed is not None and self.splits_by_slicing
                     and not self.builder.info.disable_shuffling)
    sliced = self.splits_by_slicing and process_count > 1
    if sliced:
      split = tfds.even_splits(split, n=process_count)[process_index]
    kwargs = {"read_config": read_config} if self.splits_by_slicing else {}
    ds = self.builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                                 **kwargs)
    if process_count > 1 and not sliced:
      ds = ds.shard(process_count, process_index)
    name_key = self.name_key

    def record(example):
      label = tf.cast(example[self.label_key], tf.int32)
      name = example[name_key] if name_key else tf.constant("")
      return {"image": example[self.image_key], "label": label, "name": name}

    return ds.map(record, num_parallel_calls=tf.data.AUTOTUNE)

  def num_examples(self, split: str) -> int:
    """Examples in `split` (all processes together)."""
    count = int(self.read(split).cardinality())
    if count < 0:
      raise DatasetError(f"{self.name}: cannot count the examples of split {split!r}")
    return count


def open_source(config) -> Source:
  """The prepared source named by config.dataset (prepared on first use)."""
  dataset = config.get("dataset", "fashion_mnist")
  data_dir = config.get("data_dir", None)
  if dataset == "fashion_mnist":
    return _fashion_mnist(config.get("fashion_mnist_dir", "/usr/share/datasets/fashion-mnist"),
                          data_dir)
  if dataset.startswith(FOLDER_PREFIX):
    return _image_folder(dataset[len(FOLDER_PREFIX):], config.get("check_data", True))
  return _tfds(dataset, data_dir, config.get("manual_dir", None))


def _fashion_mnist(directory: str, data_dir: str | None) -> Source:
  missing = fashion_mnist.missing_files(directory)
  if missing:
    raise DatasetError(f"Fashion-MNIST idx files missing in {directory}: {', '.join(missing)} "
                       f"(.gz or not); install them with `{fashion_mnist.INSTALL_HINT}` or "
                       f"set config.fashion_mnist_dir")
  try:
    builder = _prepared(lambda: fashion_mnist.FashionMnistLocal(source_dir=directory,
                                                                data_dir=data_dir))
  except ValueError as e:  # malformed idx file (read_idx names it)
    raise DatasetError(str(e)) from None
  return Source("fashion_mnist", builder, "image", "label", None, encoded=False,
                num_classes=len(fashion_mnist.CLASS_NAMES), splits_by_slicing=True)


@contextlib.contextmanager
def _exclusive(path: str):
  """An inter-process lock on `path`.lock: processes sharing a data dir (multi-host launches,
  SLURM tasks on one NFS home) must not prepare the same dataset at once — tfds' final rename
  then fails in all but one of them. Remote dirs (gs://...) are left unlocked: prepare those once
  beforehand."""
  if "://" in path:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _prepared(make_builder, **prepare_kwargs):
  """A prepared builder; the first process to get the lock prepares it, the others reuse it."""
  builder = make_builder()
  if _is_prepared(builder):
    return builder
  with _exclusive(str(builder.data_dir)):
    builder = make_builder()  # re-read: another process may have prepared it meanwhile
    if not _is_prepared(builder):
      builder.download_and_prepare(**prepare_kwargs)
  return builder


def _is_prepared(builder) -> bool:
  """builder.is_prepared() without its warning "Variant folder ... has no dataset_info.json",
  which tfds logs for the version folder of a dataset that is simply not prepared yet."""
  return tf.io.gfile.exists(str(builder.data_dir)) and builder.is_prepared()


def _image_folder(root: str, check: bool) -> Source:
  if not os.path.isdir(root):
    raise DatasetError(f"image folder {root} does not exist (expected {root}/<split>/<class>/"
                       f"*.jpg|png)")
  files = _folder_images(root)
  empty = [os.path.join(root, split, label) for (split, label), paths in files.items()
           if not paths]
  if empty:
    # ImageFolder would keep such a class (the model trains an output it never sees an example
    # of) or, absent from a split, lose it: a half-copied dataset should be fixed, not trained.
    raise DatasetError(f"image folder {root}: {len(empty)} class folder(s) without images "
                       f"({', '.join(IMAGE_EXTENSIONS)}), first {empty[0]}; remove them or "
                       f"add the images")
  if check:
    _check_image_files(root, [path for paths in files.values() for path in paths])
  builder = tfds.ImageFolder(root)
  info = builder.info
  splits = {name: split.num_examples for name, split in info.splits.items()}
  if not splits or not any(splits.values()):
    raise DatasetError(f"image folder {root} holds no images in <split>/<class>/ "
                       f"subdirectories (.jpg, .jpeg or .png)")
  num_classes = info.features["label"].num_classes
  if num_classes < 2:
    raise DatasetError(f"image folder {root} has {num_classes} class folder; classification "
                       f"needs at least 2 (root/<split>/<class>/*.jpg)")
  return Source(f"folder:{root}", builder, "image", "label", "image/filename", encoded=True,
                num_classes=num_classes, splits_by_slicing=False)


def _folder_images(root: str) -> dict[tuple[str, str], list[str]]:
  """{(split, class): image paths} of root/<split>/<class>/, as tfds ImageFolder lists them."""
  files = {}
  for split in sorted(e.name for e in os.scandir(root) if e.is_dir()):
    for label in sorted(e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir()):
      folder = os.path.join(root, split, label)
      files[split, label] = sorted(e.path for e in os.scandir(folder)
                                   if e.name.lower().endswith(IMAGE_EXTENSIONS))
  return files


def _check_image_files(root: str, paths: list[str]) -> None:
  """Refuses files that training or evaluation would stop on, before either starts: not an
  image, or cut short (a JPEG without its end marker, a PNG without IEND). Reads each file's
  first and last bytes only; files that look cut short are decoded to be sure (trailing bytes
  after the end marker are allowed, as TensorFlow's decoders allow them)."""
  bad = []
  for path in paths:
    with open(path, "rb") as f:
      head = f.read(8)
      f.seek(max(os.fstat(f.fileno()).st_size - _TAIL, 0))
      tail = f.read()
    if not head.startswith(IMAGE_MAGIC):
      bad.append(f"{path} (not a JPEG/PNG/GIF/BMP/WebP image)")
    elif ((head.startswith(IMAGE_MAGIC[0]) and b"\xff\xd9" not in tail)
          or (head.startswith(IMAGE_MAGIC[1]) and b"IEND" not in tail)):
      problem = _decode_problem(path)
      if problem:
        bad.append(f"{path} ({problem})")
  if bad:
    raise DatasetError(f"image folder {root}: {len(bad)} unreadable image file(s): "
                       f"{'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}; remove or "
                       f"replace them (config.check_data=False skips this check)")


def _decode_problem(path: str) -> str | None:
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except tf.errors.InvalidArgumentError as e:
    return f"truncated or corrupt: {tf_reason(e.message)}"
  return None


def _tfds(name: str, data_dir: str | None, manual_dir: str | None) -> Source:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetError(f"unknown dataset {name!r}: use 'fashion_mnist', 'imagenet2012', "
                       f"another tfds dataset name, or 'folder:/path/to/root'") from None
  if not builder.is_prepared():
    if name.split(":")[0] == "imagenet2012":
      root = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
      manual_dir = manual_dir or os.path.join(os.path.expanduser(root), "downloads", "manual")
      _check_imagenet_tars(manual_dir)
    logging.info("preparing %s in %s (tfds may download it)", name, builder.data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      builder = _prepared(lambda: tfds.builder(name, data_dir=data_dir),
                          download_config=download_config)
    except AssertionError as e:  # tfds' way of saying manual files are missing
      raise DatasetError(f"cannot prepare {name}: {' '.join(str(e).split())}") from None
  features = builder.info.features
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  keys = set(features.keys())
  if not (image_key in keys and isinstance(features[image_key], tfds.features.Image)
          and label_key in keys and isinstance(features[label_key], tfds.features.ClassLabel)):
    raise DatasetError(f"{name} is not an image-classification dataset (needs an Image "
                       f"feature and a ClassLabel feature)")
  name_key = next((k for k in ("file_name", "image/filename") if k in keys), None)
  return Source(name, builder, image_key, label_key, name_key, encoded=True,
                num_classes=features[label_key].num_classes, splits_by_slicing=True)


def _check_imagenet_tars(manual_dir: str) -> None:
  missing = [t for t in IMAGENET_TARS if not os.path.isfile(os.path.join(manual_dir, t))]
  if missing:
    raise DatasetError(f"imagenet2012 is not prepared and the manual dir {manual_dir} lacks "
                       f"{', '.join(missing)}; "
                       f"download them from image-net.org into config.manual_dir "
                       f"(see pvt_jax/data/README.md)")
