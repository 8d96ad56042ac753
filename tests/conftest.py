"""Shared test fixtures: small generated datasets (tests never download anything)."""

import gzip
import os
import shutil
import tempfile

import numpy as np
import pytest

# Once TensorFlow is loaded, importing timm (torchvision -> torch._dynamo -> triton's extension)
# segfaults here (TF 2.21, torch 2.14.1), so a run of only TF-first test files crashed; timm is
# loaded before any test module.
import timm  # noqa: F401

NUM_CLASSES = 10

# tfds reads its default data dir from TFDS_DATA_DIR once, when first imported, so this is set
# before any test module imports it: a config without data_dir (the trainer's tests, the CLI
# subprocesses, which inherit the environment) then prepares datasets here, never in
# ~/tensorflow_datasets.
_SESSION_TFDS_DIR = tempfile.mkdtemp(prefix="pvt_jax_test_tfds_")
os.environ["TFDS_DATA_DIR"] = _SESSION_TFDS_DIR


def pytest_unconfigure(config):
  del config
  shutil.rmtree(_SESSION_TFDS_DIR, ignore_errors=True)


def _class_pattern(label: int) -> np.ndarray:
  """A distinct 28x28 pattern per class (bars, blocks, rings), values 0..1."""
  yy, xx = np.mgrid[:28, :28]
  patterns = [
      (yy // 4) % 2 == 0,                      # horizontal stripes
      (xx // 4) % 2 == 0,                      # vertical stripes
      ((yy // 7) + (xx // 7)) % 2 == 0,        # checkerboard
      (yy < 14),                               # top half
      (xx < 14),                               # left half
      np.hypot(yy - 13.5, xx - 13.5) < 8,      # disc
      np.abs(np.hypot(yy - 13.5, xx - 13.5) - 10) < 2,  # ring
      np.abs(yy - xx) < 4,                     # diagonal
      (np.abs(yy - 13.5) < 3) | (np.abs(xx - 13.5) < 3),  # cross
      (yy > 20) | (xx > 20),                   # bottom-right frame
  ]
  return patterns[label].astype(np.float32)


def make_fashion_images(labels: np.ndarray, seed: int) -> np.ndarray:
  """uint8 [N, 28, 28]: each image its class pattern, randomly shifted, scaled and noisy."""
  rng = np.random.default_rng(seed)
  images = np.empty((len(labels), 28, 28), np.uint8)
  for i, label in enumerate(labels):
    pattern = np.roll(_class_pattern(int(label)), rng.integers(-2, 3, size=2), axis=(0, 1))
    image = pattern * rng.uniform(150, 255) + rng.normal(0, 25, (28, 28))
    images[i] = np.clip(image, 0, 255).astype(np.uint8)
  return images


def write_idx(path: str, array: np.ndarray) -> None:
  """An idx file (magic 0x08 = unsigned byte), gzipped when `path` ends with .gz."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory: str, num_train: int = 200, num_test: int = 50,
                        gz: bool = True, seed: int = 0) -> str:
  os.makedirs(directory, exist_ok=True)
  suffix = ".gz" if gz else ""
  for prefix, count, split_seed in (("train", num_train, seed), ("t10k", num_test, seed + 1)):
    labels = np.arange(count) % NUM_CLASSES
    np.random.default_rng(split_seed).shuffle(labels)
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"),
              make_fashion_images(labels, split_seed))
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
  return directory


@pytest.fixture(scope="session")
def tiny_fashion_mnist(tmp_path_factory) -> str:
  """A directory of small learnable Fashion-MNIST idx files (200 train / 50 test, 10 classes),
  for config.fashion_mnist_dir."""
  return write_fashion_mnist(str(tmp_path_factory.mktemp("fashion_mnist")))


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
  """A session tfds data_dir, so prepared test datasets never land in ~/tensorflow_datasets."""
  return str(tmp_path_factory.mktemp("tfds"))
