"""Statistical and reference tests of the augmentation ops (pvt_jax/data/augment.py,
randaugment.py, batch_augment.py). PIL is the reference for RandAugment's pixel ops (timm applies
them with PIL), timm's own Mixup for the train step's mixup/cutmix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from pvt_jax.data import augment, batch_augment, randaugment
from pvt_jax.data.errors import DatasetError


def sample(fn, n: int, base: int = 0):
  """fn(seed) for n different seeds, evaluated in one tf.data pass, as numpy (batched)."""
  ds = tf.data.Dataset.range(base, base + n).map(lambda i: fn(tf.stack([i, i * 7 + 3])))
  return next(ds.batch(n).as_numpy_iterator())


def test_random_resized_crop_box_distribution():
  height, width = 128, 128  # square, so accepted aspect ratios stay symmetric
  top, left, h, w = sample(
      lambda s: augment.random_resized_crop_box(s, height, width, (0.08, 1.0), (0.75, 4 / 3)),
      3000)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  log_ratio = np.log(w / h)
  # Rounding to whole pixels widens the bounds slightly.
  assert area.min() >= 0.07 and area.max() <= 1.0
  assert log_ratio.min() >= math.log(0.75) - 0.1 and log_ratio.max() <= math.log(4 / 3) + 0.1
  # Area ~ U(0.08, 1) restricted to boxes that fit: the accepted mean lies below 0.54, and
  # small and large crops both occur.
  assert 0.35 < area.mean() < 0.54
  assert (area < 0.2).mean() > 0.1 and (area > 0.8).mean() > 0.03
  assert abs(log_ratio.mean()) < 0.03  # symmetric in log-aspect
  # Positions are uniform over the free range: the crop centre averages the image centre.
  assert abs((top + h / 2).mean() - height / 2) < 3 and abs((left + w / 2).mean() - width / 2) < 3


def test_random_resized_crop_box_fallback_is_central():
  # A 1x100 strip: no box of ratio 3/4..4/3 fits, so the central fallback with ratio 4/3 runs.
  top, left, h, w = sample(lambda s: augment.random_resized_crop_box(s, 1, 100), 20)
  assert (h == 1).all() and (w == 1).all()
  assert (top == 0).all() and (left == 49).all()


def test_random_resized_crop_deterministic_and_shaped():
  image = tf.random.stateless_uniform([50, 70, 3], [1, 2], 0, 255)
  a = augment.random_resized_crop(image, tf.constant([5, 6]), 32)
  b = augment.random_resized_crop(image, tf.constant([5, 6]), 32)
  c = augment.random_resized_crop(image, tf.constant([5, 7]), 32)
  assert a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert float(tf.reduce_min(a)) >= 0 and float(tf.reduce_max(a)) <= 255


def test_resize_center_crop_matches_timm_eval_geometry():
  # 200x300 image, size 32 at crop_pct 0.8: short side -> floor(32 / 0.8) = 40, long side 60,
  # then the central 32x32 window. A horizontal ramp keeps its centre column value.
  ramp = np.tile(np.linspace(0, 255, 300, dtype=np.float32)[None, :, None], [200, 1, 3])
  out = augment.resize_center_crop(tf.constant(ramp), 32, 0.8).numpy()
  assert out.shape == (32, 32, 3)
  # Columns 14..45 of the 60-wide resize cover the middle of the ramp.
  expected = np.linspace(0, 255, 60)[14:46]
  np.testing.assert_allclose(out[16, :, 0], expected, atol=3)


@pytest.mark.parametrize("shape", [(40, 50), (150, 180), (300, 260), (100, 300)])
def test_resize_matches_pil_bicubic(shape):
  # Enlarging (plain bicubic), shrinking (antialiased) and mixed: PIL's bicubic, as timm's
  # RandomResizedCrop resizes, up to rounding and the border taps.
  rng = np.random.default_rng(shape[0])
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  pixels = 128 + 90 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.ones(3)
  pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
  got = augment.resize(tf.constant(pixels, tf.float32), 112, 120).numpy()
  expected = np.asarray(Image.fromarray(pixels).resize((120, 112), Image.BICUBIC), np.float32)
  diff = np.abs(got - expected)
  assert diff.max() <= 3 and diff.mean() < 0.3, (diff.max(), diff.mean())


@pytest.mark.parametrize("shape", [(200, 300), (311, 257), (64, 64)])
def test_resize_center_crop_equals_resizing_the_whole_image(shape):
  # Only the crop is resampled; the pixels are those of the whole resize, then cropped.
  image = tf.random.stateless_uniform(shape + (3,), [4, 2], 0, 256, tf.int32)
  image = tf.cast(image, tf.float32)
  got = augment.resize_center_crop(image, 56, 0.875).numpy()
  short = 64  # floor(56 / 0.875)
  h, w = shape
  new = (short, int(w * short / h)) if h <= w else (int(h * short / w), short)
  whole = augment.resize(image, *new).numpy()
  top, left = round((new[0] - 56) / 2), round((new[1] - 56) / 2)
  np.testing.assert_array_equal(got, whole[top:top + 56, left:left + 56])


def test_random_flip_probability_and_determinism():
  image = tf.reshape(tf.range(12, dtype=tf.float32), [2, 2, 3])
  flipped = sample(lambda s: augment.random_flip(image, s), 2000)
  was_flipped = (flipped[:, 0, 0, 0] == 3.0)
  assert set(np.unique(flipped[:, 0, 0, 0])) == {0.0, 3.0}
  assert 0.45 < was_flipped.mean() < 0.55
  again = sample(lambda s: augment.random_flip(image, s), 2000)
  np.testing.assert_array_equal(flipped, again)


def test_normalize_uses_imagenet_mean_std():
  image = tf.fill([1, 1, 3], 255.0)
  expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(augment.normalize(image).numpy()[0, 0], expected, rtol=1e-6)


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image.astype(np.uint8))


@pytest.fixture(scope="module")
def photo():
  """A smooth, structured RGB image (uint8 values) with some saturated pixels."""
  yy, xx = np.mgrid[:37, :41].astype(np.float32)
  image = np.stack([xx * 6, yy * 5 + 20, 128 + 100 * np.sin(xx / 5 + yy / 7)], -1)
  image[3:8, 5:12] = 255
  return np.clip(np.round(image), 0, 255)


@pytest.mark.parametrize("name,ours,reference", [
    ("autocontrast", lambda x: randaugment.auto_contrast(x), ImageOps.autocontrast),
    ("equalize", lambda x: randaugment.equalize(x), ImageOps.equalize),
    ("invert", lambda x: randaugment.invert(x), ImageOps.invert),
    ("posterize2", lambda x: randaugment.posterize(x, 2.0), lambda p: ImageOps.posterize(p, 2)),
    ("solarize", lambda x: randaugment.solarize(x, 100.0), lambda p: ImageOps.solarize(p, 100)),
    ("solarize_add", lambda x: randaugment.solarize_add(x, 60.0),
     lambda p: p.point([min(255, i + 60) if i < 128 else i for i in range(256)] * 3)),
    ("color", lambda x: randaugment.color(x, 1.7),
     lambda p: ImageEnhance.Color(p).enhance(1.7)),
    ("contrast", lambda x: randaugment.contrast(x, 0.4),
     lambda p: ImageEnhance.Contrast(p).enhance(0.4)),
    ("brightness", lambda x: randaugment.brightness(x, 1.5),
     lambda p: ImageEnhance.Brightness(p).enhance(1.5)),
    ("sharpness", lambda x: randaugment.sharpness(x, 1.8),
     lambda p: ImageEnhance.Sharpness(p).enhance(1.8)),
])
def test_pixel_ops_match_pil(photo, name, ours, reference):
  got = ours(tf.constant(photo)).numpy()
  expected = np.asarray(reference(_pil(photo)), np.float32)
  # PIL's fixed-point blends differ from float arithmetic by at most one level.
  assert np.abs(got - expected).max() <= 1, name


@pytest.mark.parametrize("op,level", [("rotate", 20.0), ("shear_x", 0.2), ("translate_y", 5.3),
                                      ("translate_x", -7.6), ("translate_x", 50.0)])
def test_affine_ops_match_pil_bilinear(photo, op, level):
  ones, zero = tf.constant(1.0), tf.constant(0.0)
  fill = (124, 116, 104)
  if op == "rotate":
    got = randaugment.rotate(tf.constant(photo), tf.constant(level))
    expected = _pil(photo).rotate(level, resample=Image.BILINEAR, fillcolor=fill)
  elif op == "shear_x":
    got = randaugment.pil_affine(tf.constant(photo), (ones, tf.constant(level), zero, zero, ones,
                                                      zero))
    expected = _pil(photo).transform(photo.shape[1::-1], Image.AFFINE, (1, level, 0, 0, 1, 0),
                                     resample=Image.BILINEAR, fillcolor=fill)
  else:  # translations: two shifted slices (the projective transform is kept for the rest)
    axis = 0 if op == "translate_y" else 1
    got = randaugment.translate(tf.constant(photo), tf.constant(level), axis=axis)
    coefficients = (1, 0, 0, 0, 1, level) if axis == 0 else (1, 0, level, 0, 1, 0)
    expected = _pil(photo).transform(photo.shape[1::-1], Image.AFFINE, coefficients,
                                     resample=Image.BILINEAR, fillcolor=fill)
  diff = np.abs(got.numpy() - np.asarray(expected, np.float32))
  # Interiors agree to rounding; pixels along the edge of the moved image differ in how the
  # fill is blended in (PIL does not blend it).
  assert diff[9:-9, 9:-9].max() <= 1 and (diff <= 2).mean() > 0.95, op


def test_randaugment_parse():
  spec = randaugment.parse("rand-m9-mstd0.5-inc1")
  assert (spec.num_layers, spec.magnitude, spec.magnitude_std, spec.prob) == (2, 9.0, 0.5, 0.5)
  assert randaugment.parse("rand-n3-m7-inc1").num_layers == 3
  for bad in ("auto-m9", "rand-m9-foo1", "rand-m9-mstd0.5"):
    with pytest.raises(DatasetError):
      randaugment.parse(bad)


def test_randaugment_applies_about_half_the_ops(photo):
  spec = randaugment.parse("rand-m9-mstd0.5-inc1")
  image = tf.constant(photo)
  outs = sample(lambda s: randaugment.rand_augment(image, s, spec), 400)
  changed = (outs != photo[None]).any(axis=(1, 2, 3))
  # Each of 2 layers applies an op with p = 0.5 (a few ops can leave this image unchanged).
  assert 0.6 < changed.mean() < 0.85
  assert outs.min() >= 0 and outs.max() <= 255
  np.testing.assert_array_equal(outs, np.round(outs))  # stays on the uint8 grid
  again = sample(lambda s: randaugment.rand_augment(image, s, spec), 400)
  np.testing.assert_array_equal(outs, again)


def test_randaugment_forced_ops_follow_timm_levels(photo):
  # Forced Invert (op 2) twice, always applied: the image comes back unchanged.
  spec = randaugment.RandAugmentSpec(prob=1.0)
  twice = randaugment.rand_augment(tf.constant(photo), tf.constant([1, 1]), spec,
                                   op_indices=[2, 2])
  np.testing.assert_array_equal(twice.numpy(), photo)
  # PosterizeIncreasing (op 4) at magnitude 10 keeps 4 - int(10 / 10 * 4) = 0 bits: black.
  spec = randaugment.RandAugmentSpec(num_layers=1, magnitude=10.0, magnitude_std=0.0, prob=1.0)
  black = randaugment.rand_augment(tf.constant(photo), tf.constant([1, 1]), spec,
                                   op_indices=[4])
  assert float(tf.reduce_max(black)) == 0.0
  # SolarizeIncreasing (op 5) at magnitude 10: threshold 0 inverts every pixel.
  inverted = randaugment.rand_augment(tf.constant(photo), tf.constant([1, 1]), spec,
                                      op_indices=[5])
  np.testing.assert_array_equal(inverted.numpy(), 255 - photo)


# Batch-level augmentation in the train step (JAX).

MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}


def test_batch_normalize_uses_imagenet_mean_std():
  images = jnp.full((2, 1, 1, 3), 255, jnp.uint8)
  expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(batch_augment.normalize(images)[1, 0, 0], expected, rtol=1e-6)


def test_random_erasing_probability_area_and_noise():
  height, width = 40, 50
  images = jnp.full((3000, height, width, 3), 7.0)  # a value the noise never produces exactly
  out = np.asarray(jax.jit(batch_augment.random_erasing, static_argnums=2)(
      jax.random.key(0), images, 0.25))
  erased = out != 7.0
  any_erased = erased.any(axis=(1, 2, 3))
  assert 0.22 < any_erased.mean() < 0.28
  fractions = erased[any_erased].all(axis=3).sum(axis=(1, 2)) / (height * width)
  # One box of area ~ U(0.02, 1/3) (strictly inside, so the very largest are rejected).
  assert fractions.min() >= 0.015 and fractions.max() <= 0.36
  assert 0.12 < fractions.mean() < 0.2
  # The box is filled per pixel and channel with N(0, 1) noise.
  noise = out[erased]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
  # Erased pixels form one rectangle, anywhere in the image (corners included).
  first = np.argmax(any_erased)
  rows, cols = np.nonzero(erased[first].all(axis=2))
  assert erased[first, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  boxes = erased[any_erased].all(axis=3)
  assert boxes[:, 0].any() and boxes[:, -1].any() and boxes[:, :, 0].any()
  assert boxes[:, :, -1].any()


def _targets(mixed, num_classes):
  """The [B, K] soft targets that mixup_cutmix's label fields stand for."""
  one_hot = jax.nn.one_hot(mixed["label"], num_classes)
  return (mixed["label_uniform"][:, None] / num_classes
          + jnp.sum(mixed["label_weight"][..., None] * one_hot, axis=1))


def _constant_batch(batch_size):
  # Each image a distinct constant, so the mixing weight can be read back from pixels.
  values = jnp.arange(batch_size, dtype=jnp.float32) * 10 + 10
  return jnp.broadcast_to(values[:, None, None, None], (batch_size, 16, 20, 3))


def test_mixup_cutmix_labels_and_pixels_agree():
  labels = jnp.arange(6)
  mix = jax.jit(jax.vmap(lambda k: batch_augment.mixup_cutmix(
      k, _constant_batch(6), labels, smoothing=0.0, **MIX)))
  mixed = mix(jax.random.split(jax.random.key(1), 400))
  targets = np.asarray(jax.vmap(lambda m: _targets(m, 10))(mixed))
  images = np.asarray(mixed["image"])
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
  lam = targets[:, 0, 0]  # example 0 keeps lam of its own label (its partner is example 5)
  np.testing.assert_allclose(targets[:, 0, 5], 1 - lam, atol=1e-6)
  own, partner = 10.0, 60.0
  is_cut = np.isin(images[:, 0], [own, partner]).all(axis=(1, 2, 3))
  # Cutmix: lam equals the fraction of original pixels (box-corrected); mixup: a blend.
  cut_fraction = (images[is_cut, 0] == own).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(lam[is_cut], cut_fraction, atol=1e-6)
  blend = own * lam[~is_cut] + partner * (1 - lam[~is_cut])
  np.testing.assert_allclose(images[~is_cut, 0, 0, 0, 0], blend, rtol=1e-5)
  assert 0.4 < is_cut.mean() < 0.6  # switch probability 0.5
  # Mixup lam ~ Beta(0.8, 0.8): mean 0.5, variance 1/(4 * 2.6) ~ 0.096.
  assert abs(lam[~is_cut].mean() - 0.5) < 0.06
  assert abs(lam[~is_cut].var() - 0.096) < 0.03


def test_mixup_off_leaves_images_and_smooths_labels():
  images = _constant_batch(2)
  mixed = batch_augment.mixup_cutmix(jax.random.key(0), images, jnp.array([1, 2]),
                                     **{**MIX, "prob": 0.0}, smoothing=0.1)
  np.testing.assert_array_equal(mixed["image"], images)
  targets = np.asarray(_targets(mixed, 10))
  assert np.isclose(targets[0, 1], 0.91) and np.isclose(targets[0, 0], 0.01)


class _Draws:
  """Stands in for numpy's global random functions that timm's Mixup calls, returning the
  draws of our `mixup_params` in the order timm makes them."""

  def __init__(self, params, prob, switch_prob):
    self.rands = [0.0 if params["apply"] else 1.0,
                  switch_prob / 2 if params["use_cutmix"] else (1 + switch_prob) / 2]
    self.rands[0] *= prob
    self.lam = float(params["lam"])
    self.ints = [int(params["center_y"]), int(params["center_x"])]

  def rand(self):
    return self.rands.pop(0)

  def beta(self, a, b):
    del a, b
    return self.lam

  def randint(self, low, high, size=None):
    value = self.ints.pop(0)
    assert low <= value < high and size is None
    return value


@pytest.mark.torch
def test_mixup_equals_timm_mixup_for_a_fixed_key(monkeypatch):
  import timm.data.mixup
  import timm.loss
  import torch
  batch, height, width, num_classes = 6, 12, 18, 5
  modes = set()
  for seed in range(8):
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch)
    ours = batch_augment.mixup_cutmix(key, jnp.asarray(images), jnp.asarray(labels),
                                      smoothing=0.1, **MIX)
    params = batch_augment.mixup_params(key, height, width, **MIX)
    modes.add(bool(params["use_cutmix"]))
    draws = _Draws(params, MIX["prob"], MIX["switch_prob"])
    for name in ("rand", "beta", "randint"):
      monkeypatch.setattr(timm.data.mixup.np.random, name, getattr(draws, name))
    mixup = timm.data.mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                                  mode="batch", label_smoothing=0.1, num_classes=num_classes)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    x, target = mixup(x, torch.from_numpy(labels))
    np.testing.assert_allclose(np.asarray(ours["image"]), x.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_targets(ours, num_classes)), target.numpy(),
                               atol=1e-6)
    # The loss on the implicit targets equals timm's SoftTargetCrossEntropy on its targets.
    logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
    theirs = timm.loss.SoftTargetCrossEntropy()(torch.from_numpy(logits), target)
    loss = batch_augment.soft_target_cross_entropy(jnp.asarray(logits), ours).mean()
    assert float(loss) == pytest.approx(float(theirs), rel=1e-5)
  assert modes == {False, True}  # both cutmix and mixup batches were compared
