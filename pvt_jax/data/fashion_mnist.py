"""A tfds builder for Fashion-MNIST from local idx files (offline, no checksums).

The stock `fashion_mnist` builder downloads the idx files and checks their checksums; offline it
retries for minutes, and the Debian package `dataset-fashion-mnist` ships the same data
recompressed, which the checksums reject. This builder reads the idx files (gzipped or not) from a
directory, so nothing is downloaded and tfds' checksum files are never consulted.
"""

import contextlib
import gzip
import hashlib
import logging
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def find_idx_file(directory: str, name: str) -> str | None:
  """`directory/name` or `directory/name.gz`, whichever exists (None if neither)."""
  for candidate in (name, name + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def missing_files(directory: str) -> list[str]:
  """The idx files (without .gz) that `directory` lacks."""
  names = [name for files in SPLIT_FILES.values() for name in files]
  return [name for name in names if find_idx_file(directory, name) is None]


def read_idx(path: str, magic: int) -> np.ndarray:
  """An idx file as a uint8 array; ValueError (naming the file) if its header is wrong."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header or int.from_bytes(data[:4], "big") != magic:
    raise ValueError(f"{path} is not an idx file with magic {magic:#010x}")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if len(data) - header != int(np.prod(shape)):
    raise ValueError(f"{path} holds {len(data) - header} bytes of data, its header says "
                     f"{shape}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of `split` ('train' or 'test')."""
  images_name, labels_name = SPLIT_FILES[split]
  images = read_idx(find_idx_file(directory, images_name), _IMAGES_MAGIC)
  labels = read_idx(find_idx_file(directory, labels_name), _LABELS_MAGIC)
  if len(images) != len(labels):
    raise ValueError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
  return images, labels


def source_digest(directory: str) -> str:
  """Names the prepared copy after the source files, so different directories don't collide."""
  h = hashlib.sha256(os.path.abspath(directory).encode())
  for name in sorted(n for files in SPLIT_FILES.values() for n in files):
    st = os.stat(find_idx_file(directory, name))
    h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:12]


class _CustomConfigNotice(logging.Filter):
  """tfds warns "Using custom data configuration" for any config not in BUILDER_CONFIGS; ours is
  per source directory by design, so the warning on every open is noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _without_custom_config_notice():
  logger = absl_logging.get_absl_logger()
  notice = _CustomConfigNotice()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (28x28 grey, 10 classes) read from local idx files."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source_dir: str, **kwargs):
    self._source_dir = source_dir
    config = tfds.core.BuilderConfig(name="src_" + source_digest(source_dir))
    with _without_custom_config_notice():
      super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Raw bytes rather than PNG: building and reading skip the codec entirely.
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        # Examples stay in file order (the input pipeline shuffles): skips tfds' shuffle pass.
        disable_shuffling=True,
        description=f"Fashion-MNIST from the idx files in {self._source_dir}.",
    )

  def _log_download_bytes(self) -> None:
    # Replaces tfds' "Downloading and preparing dataset Unknown size": nothing is downloaded, and
    # where the copy goes (under the home directory by default) is what a user wants to know.
    print(f"preparing Fashion-MNIST from {self._source_dir} once, into {self.data_dir} "
          f"(config.data_dir or TFDS_DATA_DIR chooses where)", file=sys.stderr)

  def _log_download_done(self) -> None:
    size = sum(os.path.getsize(os.path.join(self.data_dir, name))
               for name in os.listdir(self.data_dir))
    print(f"prepared Fashion-MNIST in {self.data_dir} ({size / 1e6:.1f} MB)", file=sys.stderr)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {split: self._generate_examples(split) for split in SPLIT_FILES}

  def _generate_examples(self, split):
    images, labels = read_split(self._source_dir, split)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image[:, :, None], "label": int(label)}
