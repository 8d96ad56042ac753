"""Training and eval image ops of the official recipe (timm `create_transform` + `Mixup`).

Every random op takes a `seed` (int32/int64 tensor [2]) and uses TF's stateless random ops, so an
example's augmentation is a function of (config.seed, epoch, position) only: a resumed run sees
the same images as an uninterrupted one. That is also why the Keras 3 preprocessing layers are
not used: they draw from a stateful SeedGenerator, and their distributions differ from timm's
(keras RandomErasing samples each side independently as sqrt(uniform) of the image side instead
of timm's area/log-aspect sampling and fills with uniform/constant values; keras MixUp and CutMix
draw one weight per example and pair examples by a random permutation, timm's batch mode draws
one weight per batch and pairs each example with the flipped batch). Images are float32 in
[0, 255] until `normalize`.
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
  to the uint8 grid as PIL's output (RandAugment's ops then see uint8 values as in timm)."""
  image = tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)
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
  """Eval transform: shorter side to floor(size / crop_pct) (bicubic), then center crop size."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  short = float(math.floor(size / crop_pct))
  factor = short / tf.minimum(h, w)
  # torchvision keeps the short side exact and truncates the long side.
  new_h = tf.where(h <= w, int(short), tf.cast(h * factor, tf.int32))
  new_w = tf.where(h <= w, tf.cast(w * factor, tf.int32), int(short))
  image = resize(image, new_h, new_w)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, None])


def random_flip(image, seed):
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def normalize(image):
  """[0, 255] -> ImageNet mean/std normalised."""
  mean = tf.constant(MEAN_RGB, tf.float32) * 255.0
  std = tf.constant(STD_RGB, tf.float32) * 255.0
  return (image - mean) / std


def random_erasing(image, seed, probability: float, area=(0.02, 1 / 3), min_aspect: float = 0.3,
                   attempts: int = 10):
  """timm RandomErasing(mode='pixel', max_count=1) on a normalised image.

  With `probability`: up to 10 tries of a box of area ~ U(area) * image area and log-aspect ~
  U(log 0.3, log 1/0.3) strictly inside the image; the first that fits is filled with per-pixel,
  per-channel N(0, 1) noise (noise in normalised units, as timm applies it after Normalize).
  """
  s_apply, s_area, s_aspect, s_top, s_left, s_noise = split_seed(seed, 6)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  target = (tf.cast(height * width, tf.float32) *
            tf.random.stateless_uniform([attempts], s_area, area[0], area[1]))
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s_aspect, math.log(min_aspect),
                                              math.log(1 / min_aspect)))
  box_h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (box_w < width) & (box_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box_h, box_w = box_h[first], box_w[first]
  top = _randint(s_top, height - box_h)
  left = _randint(s_left, width - box_w)
  erase = (tf.random.stateless_uniform([], s_apply) < probability) & tf.reduce_any(fits)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  # The noise is only drawn for the images that are erased (most are not).
  return tf.cond(erase, lambda: tf.where(inside, tf.random.stateless_normal(shape, s_noise), image),
                 lambda: image)


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """timm's one-hot with label smoothing: off = s / K, on = 1 - s + s / K."""
  off = smoothing / num_classes
  return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def _sample_beta(seed, alpha: float):
  """Beta(alpha, alpha) from two stateless gammas (TF has no stateless beta sampler)."""
  s1, s2 = split_seed(seed, 2)
  g1 = tf.random.stateless_gamma([], s1, alpha)
  g2 = tf.random.stateless_gamma([], s2, alpha)
  return g1 / (g1 + g2)


def cutmix_box(seed, height, width, lam):
  """timm rand_bbox: a box of sides int(side * sqrt(1 - lam)) centred uniformly, clipped.

  Returns (top, bottom, left, right) and lam corrected to 1 - clipped box area / image area.
  """
  s_y, s_x = split_seed(seed, 2)
  cut = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
  cy = tf.random.stateless_uniform([], s_y, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, width, tf.int32)
  top = tf.clip_by_value(cy - cut_h // 2, 0, height)
  bottom = tf.clip_by_value(cy + cut_h // 2, 0, height)
  left = tf.clip_by_value(cx - cut_w // 2, 0, width)
  right = tf.clip_by_value(cx + cut_w // 2, 0, width)
  area = tf.cast((bottom - top) * (right - left), tf.float32)
  return top, bottom, left, right, 1.0 - area / tf.cast(height * width, tf.float32)


def mixup_cutmix(images, labels, seed, num_classes: int, *, mixup_alpha: float,
                 cutmix_alpha: float, prob: float, switch_prob: float, smoothing: float):
  """timm Mixup(mode='batch'): one lam per batch, each example mixed with the flipped batch.

  With `prob`: cutmix (with `switch_prob` when both are on) or mixup; labels become smoothed
  one-hot targets mixed with the same lam (cutmix lam corrected by the clipped box area).
  Returns (images, soft labels [B, K]).
  """
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, targets
  s_apply, s_switch, s_lam, s_box = split_seed(seed, 4)
  apply = tf.random.stateless_uniform([], s_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], s_switch) < switch_prob
  else:
    use_cutmix = tf.constant(cutmix_alpha > 0)
  lam = tf.where(use_cutmix, _sample_beta(s_lam, cutmix_alpha or 1.0),
                 _sample_beta(s_lam, mixup_alpha or 1.0))
  flipped = images[::-1]
  shape = tf.shape(images)
  top, bottom, left, right, box_lam = cutmix_box(s_box, shape[1], shape[2], lam)
  rows = tf.range(shape[1])[None, :, None, None]
  cols = tf.range(shape[2])[None, None, :, None]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cut = tf.where(inside, flipped, images)
  mixed = images * lam + flipped * (1.0 - lam)
  lam = tf.where(apply, tf.where(use_cutmix, box_lam, lam), 1.0)
  images = tf.where(apply, tf.where(use_cutmix, cut, mixed), images)
  return images, targets * lam + targets[::-1] * (1.0 - lam)
