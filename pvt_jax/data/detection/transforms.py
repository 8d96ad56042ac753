"""mmdet's detection transforms: keep-ratio `Resize` (its rounding), `RandomFlip`, `Normalize`
and zero padding, as plans computed on the host (sizes, boxes) and pixel ops in tf.data.

Images are resized to uint8 as mmdet's cv2 pipeline does (bilinear, half-pixel centres, no
antialiasing, rounded), normalised with the ImageNet mean/std in RGB, and padded with zeros
(after normalisation, as mmdet pads) to a fixed canvas.
"""

import numpy as np
import tensorflow as tf

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def resized_sizes(sizes: np.ndarray, long_edge, short_edge) -> np.ndarray:
  """int32 [N, 2] (h, w) after mmcv's `rescale_size` with scale (long_edge, short_edge):
  factor min(long / max(h, w), short / min(h, w)), sides int(side * factor + 0.5).
  `short_edge` may be per image (multi-scale training)."""
  h, w = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
  factor = np.minimum(long_edge / np.maximum(h, w), np.asarray(short_edge) / np.minimum(h, w))
  return np.stack([(h * factor + 0.5).astype(np.int64), (w * factor + 0.5).astype(np.int64)],
                  1).astype(np.int32)


def padded(sizes: np.ndarray, divisor: int) -> np.ndarray:
  return -(-sizes // divisor) * divisor


def assign_canvases(max_sizes: np.ndarray, canvases, divisor: int, name: str) -> np.ndarray:
  """Index of the first canvas (h, w) holding each image's largest resized size padded to the
  divisor; ValueError naming an image that fits none."""
  canvases = np.asarray(canvases, np.int64).reshape(-1, 2)
  need = padded(max_sizes.astype(np.int64), divisor)
  fits = (need[:, None, :] <= canvases[None]).all(-1)
  if not fits.any(1).all():
    bad = int(np.flatnonzero(~fits.any(1))[0])
    raise ValueError(f"{name}: image {bad} resized and padded to {tuple(need[bad])} fits none of "
                     f"the canvas sizes {[tuple(c) for c in canvases]}")
  return fits.argmax(1)


def transform_boxes(boxes: np.ndarray, size: np.ndarray, new_size: np.ndarray, flip: bool):
  """Boxes of a (h, w) image after resizing to new_size (scaled by new/old per axis, clipped to
  the resized image, as mmdet's Resize) and an optional horizontal flip (x -> w - x)."""
  scale = np.array([new_size[1] / size[1], new_size[0] / size[0]] * 2, np.float32)
  limit = np.array([new_size[1], new_size[0]] * 2, np.float32)
  boxes = np.clip(boxes * scale, 0, limit)
  if flip:
    boxes = np.stack([limit[0] - boxes[:, 2], boxes[:, 1], limit[0] - boxes[:, 0], boxes[:, 3]],
                     1)
  return boxes


def prepare_image(image, new_size, flip, canvas):
  """uint8 [h, w, 3] -> float32 [canvas h, canvas w, 3]: resized to new_size (h, w), flipped if
  `flip`, normalised and zero-padded."""
  image = tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear",
                          antialias=False)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  image = (image - tf.constant(MEAN)) / tf.constant(STD)
  return tf.pad(image, [[0, canvas[0] - new_size[0]], [0, canvas[1] - new_size[1]], [0, 0]])


def to_uint8(images: np.ndarray, image_sizes: np.ndarray) -> list:
  """Normalised batch images [n, H, W, 3] -> the resized images as uint8, without padding."""
  pixels = np.clip(np.round(images * np.array(STD) + np.array(MEAN)), 0, 255).astype(np.uint8)
  return [p[:h, :w] for p, (h, w) in zip(pixels, image_sizes, strict=True)]
