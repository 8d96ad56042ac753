"""The official recipe's batch-level augmentation in JAX, inside the jitted train step.

The input pipeline hands over uint8 images and integer labels; here, on the accelerator, come
ImageNet normalisation, random erasing and mixup/cutmix with label smoothing, as timm's GPU path
does (its PrefetchLoader normalises and erases on the device; `Mixup` works on a whole batch).
That keeps the host's per-image work to decoding and the PIL-like ops of the crop, flip and
RandAugment, and ships a quarter of the bytes. Every draw comes from the key the train step folds
from the step number, and per-example draws from that key split over the global batch, so the
result depends neither on where a run resumed nor on how the batch is sharded over devices.

Targets stay implicit: timm's smoothed, mixed soft target of example i is

  t_i = smoothing / K + (1 - smoothing) * (lam * one_hot(y_i) + (1 - lam) * one_hot(y_{B-1-i}))

which `mixup_cutmix` returns as labels [B, 2] (own, partner), their weights [B, 2] and the
uniform part [B]: the class count K is the model's (the loss reads it from the logits), and the
per-example fields survive the train step's micro-batching.
"""

import math

import jax
import jax.numpy as jnp

from pvt_jax.data.augment import MEAN_RGB, STD_RGB


def normalize(images):
  """uint8 (or [0, 255] float) images -> float32, ImageNet mean/std normalised."""
  mean = jnp.asarray(MEAN_RGB, jnp.float32) * 255.0
  std = jnp.asarray(STD_RGB, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def _erase_one(key, image, probability, area, min_aspect, attempts):
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  height, width = image.shape[0], image.shape[1]
  target = height * width * jax.random.uniform(k_area, [attempts], minval=area[0],
                                               maxval=area[1])
  aspect = jnp.exp(jax.random.uniform(k_aspect, [attempts], minval=math.log(min_aspect),
                                      maxval=math.log(1 / min_aspect)))
  box_h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (box_w < width) & (box_h < height)
  first = jnp.argmax(fits)
  box_h, box_w = box_h[first], box_w[first]
  top = jax.random.randint(k_top, [], 0, height - box_h + 1)
  left = jax.random.randint(k_left, [], 0, width - box_w + 1)
  erase = (jax.random.uniform(k_apply) < probability) & fits.any()
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  noise = jax.random.normal(k_noise, image.shape, image.dtype)
  return jnp.where(erase & inside, noise, image)


def random_erasing(key, images, probability: float, area=(0.02, 1 / 3),
                   min_aspect: float = 0.3, attempts: int = 10):
  """timm RandomErasing(mode='pixel', max_count=1) on each image of a normalised batch.

  With `probability`: up to 10 tries of a box of area ~ U(area) * image area and log-aspect ~
  U(log 0.3, log 1/0.3) strictly inside the image; the first that fits is filled with per-pixel,
  per-channel N(0, 1) noise (normalised units, as timm erases after Normalize).
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: _erase_one(k, x, probability, area, min_aspect, attempts))(
      keys, images)


def mixup_params(key, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float,
                 prob: float, switch_prob: float) -> dict:
  """One batch's draws of timm Mixup(mode='batch'): whether it mixes, cutmix or mixup, the
  Beta(alpha, alpha) weight and the cutmix box centre (rand_bbox's randint over the image)."""
  k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(key, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam = jnp.where(use_cutmix, jax.random.beta(k_lam, cutmix_alpha or 1.0, cutmix_alpha or 1.0),
                  jax.random.beta(k_lam, mixup_alpha or 1.0, mixup_alpha or 1.0))
  return {"apply": jax.random.uniform(k_apply) < prob, "use_cutmix": use_cutmix, "lam": lam,
          "center_y": jax.random.randint(k_y, [], 0, height),
          "center_x": jax.random.randint(k_x, [], 0, width)}


def cutmix_box(params: dict, height: int, width: int):
  """timm rand_bbox + cutmix_bbox_and_lam(correct_lam=True): sides int(side * sqrt(1 - lam))
  around the centre, clipped; (top, bottom, left, right) and 1 - clipped area / image area."""
  cut = jnp.sqrt(1.0 - params["lam"])
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  cy, cx = params["center_y"], params["center_x"]
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  lam = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
  return top, bottom, left, right, lam


def mixup_cutmix(key, images, labels, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
                 switch_prob: float, smoothing: float, group: int = 0) -> dict:
  """timm Mixup(mode='batch', correct_lam=True) + label smoothing on a normalised batch.

  One draw per group of `group` consecutive examples (0, or at least the batch: one group), as
  timm draws once per GPU's batch (128 in the official 8 x 128 recipe): with `prob`, cutmix (with
  `switch_prob` when both are on) pastes the flipped group's box, or mixup blends with the
  flipped group; lam weighs the labels (cutmix's corrected by the clipped box). Returns
  {'image', 'label' [B, 2], 'label_weight' [B, 2], 'label_uniform' [B]} (the targets of the
  module docstring).
  """
  batch = images.shape[0]
  if 0 < group < batch:
    if batch % group:
      raise ValueError(f"a batch of {batch} is not whole groups of {group}")
    keys = jax.random.split(key, batch // group)
    grouped = jax.vmap(lambda k, x, y: mixup_cutmix(
        k, x, y, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
        switch_prob=switch_prob, smoothing=smoothing))(
            keys, images.reshape(-1, group, *images.shape[1:]), labels.reshape(-1, group))
    return jax.tree.map(lambda v: v.reshape(batch, *v.shape[2:]), grouped)
  batch, height, width = images.shape[:3]
  lam = jnp.float32(1.0)
  if (mixup_alpha > 0 or cutmix_alpha > 0) and prob > 0:
    params = mixup_params(key, height, width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                          prob=prob, switch_prob=switch_prob)
    top, bottom, left, right, box_lam = cutmix_box(params, height, width)
    flipped = images[::-1]
    rows = jnp.arange(height)[None, :, None, None]
    cols = jnp.arange(width)[None, None, :, None]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    cut = jnp.where(inside, flipped, images)
    blend = images * params["lam"] + flipped * (1.0 - params["lam"])
    mixed = jnp.where(params["use_cutmix"], cut, blend)
    images = jnp.where(params["apply"], mixed, images)
    lam = jnp.where(params["apply"], jnp.where(params["use_cutmix"], box_lam, params["lam"]), 1.0)
  weights = (1.0 - smoothing) * jnp.stack([lam, 1.0 - lam])
  return {"image": images, "label": jnp.stack([labels, labels[::-1]], axis=-1),
          "label_weight": jnp.broadcast_to(weights, (batch, 2)),
          "label_uniform": jnp.full((batch,), smoothing, jnp.float32)}


def soft_target_cross_entropy(logits, batch: dict):
  """Per-example cross-entropy against the implicit targets of `mixup_cutmix` (equal to timm's
  SoftTargetCrossEntropy on its mixup_target, without materialising [B, K] targets)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(log_p, batch["label"], axis=-1)
  return -(batch["label_uniform"] * log_p.mean(-1) + jnp.sum(batch["label_weight"] * picked, -1))
