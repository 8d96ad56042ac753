"""The official Semantic FPN data pipeline (mmseg 0.13 `_base_/datasets/ade20k.py` + PVT's
`AlignResize`) as TensorFlow ops on one example.

Train: Resize (2048, 512) x ratio in [0.5, 2.0] keeping the aspect ratio -> RandomCrop 512x512
(cat_max_ratio 0.75) -> RandomFlip 0.5 -> PhotoMetricDistortion -> Normalize -> Pad (image 0,
label 255). Eval: rescale into (2048, 512) keeping the ratio, then resize to sides that are
multiples of 32 (`AlignResize`); the label stays at its original size.

Images are float32 on the uint8 grid ([0, 255], rounded after every op that mmcv performs on
uint8 arrays) until `normalize`; labels are int32. Every random op takes a stateless seed
(int64 [2]), so an example's augmentation is a function of (seed, epoch, position) only. Geometry
follows mmcv: `imrescale`'s rounding, cv2's INTER_LINEAR for images (half-pixel centres, no
antialiasing) and INTER_NEAREST for labels (source index floor(dst * in / out)).
"""

import numpy as np
import tensorflow as tf

from pvt_jax.data import augment

IGNORE_INDEX = 255


def reduce_zero_label(label):
  """mmseg's `reduce_zero_label`: 0 (ADE20K's "other") -> 255 (ignored), every class k -> k - 1."""
  return tf.where(label == 0, IGNORE_INDEX, tf.where(label == IGNORE_INDEX, IGNORE_INDEX,
                                                     label - 1))


def _fit(height, width, long_edge, short_edge):
  """mmcv `imrescale`: the largest size with the image's aspect ratio within (long_edge,
  short_edge), each side int(side * factor + 0.5)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  long_edge, short_edge = tf.cast(long_edge, tf.float64), tf.cast(short_edge, tf.float64)
  factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
  return tf.cast(h * factor + 0.5, tf.int32), tf.cast(w * factor + 0.5, tf.int32)


def random_rescale_size(seed, height, width, scale, ratio_range):
  """mmseg `Resize(img_scale, ratio_range, keep_ratio=True)`: the scale's edges times a ratio
  ~ U(ratio_range), truncated to int, then the image fitted into them keeping its aspect ratio."""
  ratio = tf.random.stateless_uniform([], seed, ratio_range[0], ratio_range[1], tf.float64)
  edges = (tf.cast(scale[0] * ratio, tf.int32), tf.cast(scale[1] * ratio, tf.int32))
  return _fit(height, width, tf.maximum(*edges), tf.minimum(*edges))


def resize_image(image, height, width):
  """cv2 INTER_LINEAR on a uint8 image: bilinear with half-pixel centres, no antialiasing,
  rounded to the uint8 grid."""
  image = tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=False)
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _nearest_indices(in_size, out_size):
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  index = tf.cast(tf.floor(tf.cast(tf.range(out_size), tf.float64) * scale), tf.int32)
  return tf.minimum(index, in_size - 1)


def resize_label(label, height, width):
  """cv2 INTER_NEAREST: source pixel floor(dst * in / out) per axis ([H, W] int32)."""
  shape = tf.shape(label)
  label = tf.gather(label, _nearest_indices(shape[0], height), axis=0)
  return tf.gather(label, _nearest_indices(shape[1], width), axis=1)


def _randint(seed, high):
  """Uniform integer in [0, high] (inclusive), as numpy's randint(0, high + 1)."""
  return tf.random.stateless_uniform([], seed, 0, high + 1, tf.int32)


def random_crop(seed, image, label, crop_size, cat_max_ratio: float, num_tries: int = 10):
  """mmseg `RandomCrop(crop_size, cat_max_ratio)`: a crop_size window (the whole side where the
  image is smaller) at a uniform offset; with cat_max_ratio < 1, up to `num_tries` windows are
  checked for holding more than one non-ignored class and no class above that share of the
  non-ignored pixels. The first that passes wins; if none does, mmseg uses one more, unchecked."""
  shape = tf.shape(label)
  crop_h, crop_w = tf.minimum(crop_size[0], shape[0]), tf.minimum(crop_size[1], shape[1])
  seeds = augment.split_seed(seed, 2 * (num_tries + 1))
  offsets = [(_randint(seeds[2 * i], shape[0] - crop_h), _randint(seeds[2 * i + 1],
                                                                  shape[1] - crop_w))
             for i in range(num_tries + 1)]
  chosen = offsets[-1]
  if cat_max_ratio < 1.0:
    for top, left in reversed(offsets[:-1]):  # the earliest passing window is selected last
      window = label[top:top + crop_h, left:left + crop_w]
      counts = tf.math.bincount(tf.reshape(window, [-1]), minlength=256, maxlength=256)[:255]
      passes = ((tf.math.count_nonzero(counts) > 1)
                & (tf.cast(tf.reduce_max(counts), tf.float64)
                   < cat_max_ratio * tf.cast(tf.reduce_sum(counts), tf.float64)))
      chosen = (tf.where(passes, top, chosen[0]), tf.where(passes, left, chosen[1]))
  top, left = chosen
  return (image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w])


def random_flip(seed, image, label, probability: float):
  """Horizontal flip of image and label together with `probability`."""
  flip = tf.random.stateless_uniform([], seed) < probability
  return (tf.where(flip, tf.reverse(image, [1]), image),
          tf.where(flip, tf.reverse(label, [1]), label))


def _uint8(image):
  """mmseg's `convert`: clip to [0, 255] and cast to uint8 (truncation)."""
  return tf.floor(tf.clip_by_value(image, 0.0, 255.0))


def photometric_distortion(seed, image, brightness_delta: float = 32.0,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta: int = 18):
  """mmseg `PhotoMetricDistortion`, each step with probability 0.5 in mmseg's order: brightness
  (+U(-32, 32)); contrast (x U(0.5, 1.5)) either second or last (a coin flip); saturation
  (x U(0.5, 1.5) in HSV); hue (+ an integer in [-18, 18) of cv2's 180 hue steps). Values are
  truncated to uint8 after each step, as mmseg's `convert` does. HSV is TensorFlow's float HSV
  rather than cv2's 8-bit one, a difference of at most a few grey levels."""
  s = augment.split_seed(seed, 10)

  def coin(k):
    return tf.random.stateless_uniform([], s[k]) < 0.5

  def contrast(image):
    alpha = tf.random.stateless_uniform([], s[3], contrast_range[0], contrast_range[1])
    return tf.where(coin(2), _uint8(image * alpha), image)

  beta = tf.random.stateless_uniform([], s[1], -brightness_delta, brightness_delta)
  image = tf.where(coin(0), _uint8(image + beta), image)
  contrast_first = coin(4)
  image = tf.where(contrast_first, contrast(image), image)
  hsv = tf.image.rgb_to_hsv(image / 255.0)
  alpha = tf.random.stateless_uniform([], s[6], saturation_range[0], saturation_range[1])
  saturated = tf.concat([hsv[..., :1], tf.clip_by_value(hsv[..., 1:2] * alpha, 0.0, 1.0),
                         hsv[..., 2:]], axis=-1)
  image = tf.where(coin(5), _uint8(tf.round(tf.image.hsv_to_rgb(saturated) * 255.0)), image)
  hsv = tf.image.rgb_to_hsv(image / 255.0)
  shift = tf.cast(tf.random.stateless_uniform([], s[8], -hue_delta, hue_delta, tf.int32),
                  tf.float32) / 180.0
  shifted = tf.concat([tf.math.floormod(hsv[..., :1] + shift, 1.0), hsv[..., 1:]], axis=-1)
  image = tf.where(coin(7), _uint8(tf.round(tf.image.hsv_to_rgb(shifted) * 255.0)), image)
  return tf.where(contrast_first, image, contrast(image))


def pad(image, label, height: int, width: int):
  """Pad bottom/right to height x width: image with 0 (after normalisation), label with 255."""
  shape = tf.shape(label)
  paddings = [[0, height - shape[0]], [0, width - shape[1]]]
  image = tf.pad(image, paddings + [[0, 0]])
  label = tf.pad(label, paddings, constant_values=IGNORE_INDEX)
  return tf.ensure_shape(image, [height, width, 3]), tf.ensure_shape(label, [height, width])


def train_example(seed, image, label, *, crop_size, scale, ratio_range, cat_max_ratio: float,
                  flip_probability: float, photometric: bool):
  """The official training pipeline on one decoded example -> (normalised [S, S, 3], [S, S])."""
  s_resize, s_crop, s_flip, s_photo = augment.split_seed(seed, 4)
  shape = tf.shape(label)
  height, width = random_rescale_size(s_resize, shape[0], shape[1], scale, ratio_range)
  image, label = resize_image(image, height, width), resize_label(label, height, width)
  image, label = random_crop(s_crop, image, label, crop_size, cat_max_ratio)
  image, label = random_flip(s_flip, image, label, flip_probability)
  if photometric:
    image = photometric_distortion(s_photo, image)
  return pad(augment.normalize(image), label, *crop_size)


def eval_sizes(heights, widths, scale, size_divisor: int):
  """(rescaled, aligned) sizes of eval images (numpy int [N, 2] each, from [N] original sides):
  fitted into `scale` keeping the aspect ratio (mmcv `imrescale`), then each side rounded up to a
  multiple of `size_divisor` (PVT's `AlignResize`, which resizes the image again to that)."""
  rescaled = np.stack([t.numpy() for t in _fit(heights, widths, max(scale), min(scale))], -1)
  aligned = -(-rescaled // size_divisor) * size_divisor
  return rescaled, aligned


def eval_image(image, rescaled, aligned):
  """`AlignResize`'s two uint8 resizes (to the rescaled, then to the aligned size), normalised."""
  image = resize_image(image, *rescaled)
  return augment.normalize(resize_image(image, *aligned))
