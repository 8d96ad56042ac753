"""Statistical and reference tests of the augmentation ops (pvt_jax/data/augment.py,
randaugment.py). PIL is the reference for RandAugment's pixel ops (timm applies them with PIL)."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from pvt_jax.data import augment, randaugment
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


def test_random_erasing_probability_area_and_noise():
  height, width = 40, 50
  image = tf.fill([height, width, 3], 7.0)  # a value the noise never produces exactly
  out = sample(lambda s: augment.random_erasing(image, s, 0.25), 3000)
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
  # Erased pixels form one rectangle.
  first = np.argmax(any_erased)
  rows, cols = np.nonzero(erased[first].all(axis=2))
  box = erased[first, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  assert box.all()


def test_smooth_one_hot_values():
  targets = augment.smooth_one_hot(tf.constant([3, 0]), 10, 0.1).numpy()
  np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
  assert np.isclose(targets[0, 3], 0.91) and np.isclose(targets[0, 0], 0.01)


def _mix(seed, labels, **kwargs):
  # Each image a distinct constant, so the mixing weight can be read back from pixels.
  values = tf.cast(tf.range(len(labels)) * 10 + 10, tf.float32)
  images = tf.broadcast_to(values[:, None, None, None], [len(labels), 16, 20, 3])
  params = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
            "smoothing": 0.0}
  params.update(kwargs)
  return augment.mixup_cutmix(images, tf.constant(labels), seed, 10, **params)


def test_mixup_cutmix_labels_and_pixels_agree():
  labels = [0, 1, 2, 3, 4, 5]
  images, targets = sample(lambda s: _mix(s, labels), 400)
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


def test_mixup_with_label_smoothing_and_off():
  _, targets = sample(lambda s: _mix(s, [1, 2], smoothing=0.1), 50)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
  assert targets.min() >= 0.01 - 1e-6
  images, targets = sample(lambda s: _mix(s, [1, 2], prob=0.0, smoothing=0.1), 5)
  assert np.isclose(targets[:, 0, 1], 0.91).all() and (images[:, 0] == 10).all()


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


@pytest.mark.parametrize("op,level", [("rotate", 20.0), ("shear_x", 0.2), ("translate_y", 5.0)])
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
  else:
    got = randaugment.pil_affine(tf.constant(photo), (ones, zero, zero, zero, ones,
                                                      tf.constant(level)))
    expected = _pil(photo).transform(photo.shape[1::-1], Image.AFFINE, (1, 0, 0, 0, 1, level),
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
