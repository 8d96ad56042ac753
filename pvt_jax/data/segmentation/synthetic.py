"""An offline segmentation set from the Fashion-MNIST idx files: garments pasted on a canvas.

Each canvas (default 64x64) holds 1-3 Fashion-MNIST items, each resized to 28-56 px (uniform
scale 1-2) and pasted at a uniform position (clipped at the border); later items occlude earlier
ones. An item's foreground pixels (its resized grey value >= 48 of 255) carry its class + 1
(1..10); every other pixel is background, class 0. The background is a real class, not ignored:
with it ignored, painting the whole canvas with the item's class would score perfectly, so only
classification would be measured; as a class, every garment's IoU also pays for bleeding into the
background. Canvases have a dim noisy background, so the task is not thresholding alone.

Train canvases take their items from Fashion-MNIST's train split, validation canvases from its
test split; everything is a function of (seed, split), built in memory with numpy.
"""

import functools

import numpy as np
from PIL import Image

from pvt_jax.data import fashion_mnist
from pvt_jax.data.errors import DatasetError

CLASS_NAMES = ("background", *fashion_mnist.CLASS_NAMES)
FOREGROUND_THRESHOLD = 48
SPLITS = {"train": "train", "validation": "test"}  # our split -> Fashion-MNIST split of the items


@functools.lru_cache(maxsize=4)
def _items(directory: str, split: str):
  missing = fashion_mnist.missing_files(directory)
  if missing:
    raise DatasetError(f"Fashion-MNIST idx files missing in {directory}: {', '.join(missing)} "
                       f"(.gz or not); install them with `{fashion_mnist.INSTALL_HINT}` or "
                       f"set config.fashion_mnist_dir")
  try:
    return fashion_mnist.read_split(directory, split)
  except ValueError as error:
    raise DatasetError(str(error)) from None


def compose(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int,
            max_items: int = 3):
  """One canvas: (image uint8 [size, size, 3], label uint8 [size, size])."""
  image = rng.normal(40.0, 12.0, (size, size)).clip(0, 255)
  label = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(1, max_items + 1)):
    index = rng.integers(len(items))
    side = int(round(28 * rng.uniform(1.0, 2.0)))
    item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR),
                      np.float64)
    top, left = rng.integers(-side // 4, size - 3 * side // 4, size=2)
    rows = slice(max(top, 0), min(top + side, size))
    cols = slice(max(left, 0), min(left + side, size))
    patch = item[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]
    foreground = patch >= FOREGROUND_THRESHOLD
    image[rows, cols][foreground] = patch[foreground]
    label[rows, cols][foreground] = labels[index] + 1
  grey = np.round(image).astype(np.uint8)
  return np.repeat(grey[:, :, None], 3, axis=2), label


@functools.lru_cache(maxsize=4)
def build(directory: str, split: str, num_examples: int, size: int, seed: int):
  """(images uint8 [N, size, size, 3], labels uint8 [N, size, size]) of our `split`."""
  if split not in SPLITS:
    raise DatasetError(f"fashion_mnist_seg has no split {split!r} (splits: "
                       f"{', '.join(SPLITS)})")
  items, labels = _items(directory, SPLITS[split])
  rng = np.random.default_rng([seed, list(SPLITS).index(split)])
  pairs = [compose(rng, items, labels, size) for _ in range(num_examples)]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
