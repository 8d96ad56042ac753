"""Per-image training and eval ops of the official recipe (timm `create_transform`), in tf.data.

Every random op takes a `seed` (int32/int64 tensor [2]) and uses TF's stateless random ops, so an
example's augmentation is a function of (config.seed, epoch, position) only: a resumed run sees
the same images as an uninterrupted one. That is also why the Keras 3 preprocessing layers are
not used: they draw from a stateful SeedGenerator. Random erasing and mixup/cutmix work on
whole batches in the train step (batch_augment.py). Images are float32 in [0, 255].
"""

import math

import tensorflow as tf

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def split_seed(seed, num: int):
  """`num` independent seeds [2] from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def resize(image, height, width):
  """Bicubic resize with antialiasing (like PIL's bicubic when shrinking), rounded and clipped
  to the uint8 grid as PIL's output (RandAugment's ops then see uint8 values as in timm).

  Enlarging on both axes needs no antialiasing: TF's plain bicubic (the same Keys kernel, a
  quarter of the CPU time of the antialiased ScaleAndTranslate) then does it; it differs only
  in how the border pixels' taps outside the image are handled (both within PIL's +-3).
  """
  size = tf.stack([height, width])
  shape = tf.shape(image)[:2]
  image = tf.cond(
      tf.reduce_all(shape <= size),
      lambda: tf.image.resize(image, size, method="bicubic"),
      lambda: tf.image.resize(image, size, method="bicubic", antialias=True))
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def random_resized_crop_box(seed, height, width, scale=(0.08, 1.0), ratio=(0.75, 4 / 3),
                            attempts: int = 10):
  """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params.

  Up to 10 tries of area ~ U(scale) * image area and log-aspect ~ U(log ratio); the first that
  fits wins, else a central crop with the aspect ratio clamped into `ratio`.
  """
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]),
                                              math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # Central fallback, aspect ratio clamped into `ratio`.
  in_ratio = w / h
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  crop_h = tf.where(found, crop_h[first], fb_h)
  crop_w = tf.where(found, crop_w[first], fb_w)
  top = tf.where(found, _randint(s_top, height - crop_h), (height - crop_h) // 2)
  left = tf.where(found, _randint(s_left, width - crop_w), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def _randint(seed, high):
  """Uniform integer in [0, high] (inclusive, like random.randint(0, high))."""
  u = tf.random.stateless_uniform([], seed)
  return tf.minimum(tf.cast(u * tf.cast(high + 1, tf.float32), tf.int32), high)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)):
  """RandomResizedCrop of a decoded image (the pipeline fuses the crop into JPEG decoding)."""
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_box(seed, shape[0], shape[1], scale, ratio)
  return resize(image[top:top + h, left:left + w], size, size)


def resize_center_crop(image, size: int, crop_pct: float):
  """Eval transform: shorter side to floor(size / crop_pct) (bicubic), then center crop size.

  Only the crop is computed: the resize's kernel is evaluated at the crop's output pixels
  (ScaleAndTranslate shifted by the crop offset), the same pixels as resizing the whole image
  and cropping, for 0.77x the resize work at crop_pct 0.875.
  """
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  short = float(math.floor(size / crop_pct))
  factor = short / tf.minimum(h, w)
  # torchvision keeps the short side exact and truncates the long side.
  new_h = tf.where(h <= w, int(short), tf.cast(h * factor, tf.int32))
  new_w = tf.where(h <= w, tf.cast(w * factor, tf.int32), int(short))
  top = tf.round(tf.cast(new_h - size, tf.float32) / 2)
  left = tf.round(tf.cast(new_w - size, tf.float32) / 2)
  scale = tf.stack([tf.cast(new_h, tf.float32) / h, tf.cast(new_w, tf.float32) / w])
  image = tf.raw_ops.ScaleAndTranslate(
      images=tf.cast(image, tf.float32)[None], size=[size, size], scale=scale,
      translation=tf.stack([-top, -left]), kernel_type="keyscubic", antialias=True)[0]
  return tf.ensure_shape(tf.clip_by_value(tf.round(image), 0.0, 255.0), [size, size, None])


def random_flip(image, seed):
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def normalize(image):
  """[0, 255] -> ImageNet mean/std normalised."""
  mean = tf.constant(MEAN_RGB, tf.float32) * 255.0
  std = tf.constant(STD_RGB, tf.float32) * 255.0
  return (image - mean) / std
