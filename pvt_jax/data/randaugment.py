"""timm's RandAugment (`rand-m9-mstd0.5-inc1`) as stateless TF ops inside tf.data.

Hand-written because Keras 3's RandAugment is a different augmentation: its op set lacks Invert
and SolarizeAdd, its strength is a [0, 1] `factor` rather than timm's magnitude-out-of-10 with
per-op level functions, and it draws from a stateful SeedGenerator (no per-example seeding, so
no exact resume). Here, as in timm: `num_layers` ops chosen uniformly with replacement from the
15 "increasing severity" ops; each is applied with probability 0.5 at magnitude
clip(N(m, mstd), 0, 10); signed ops flip their direction with probability 0.5. Ops follow PIL's
uint8 arithmetic (truncation, PIL's grey conversion and smoothing kernel); affine ops fill with
timm's ImageNet-mean colour. One difference: affine ops interpolate bilinearly (TF's projective
transform has no bicubic mode) where the official recipe uses PIL bicubic.

Cost (profiled as CPU time per 224 px image inside tf.data): full-image selects (`tf.where`) cost
~9x an arithmetic pass in TF's kernels, so per-pixel choices are written as masks times values;
translations are two shifted slices instead of a projective transform (2.2x cheaper), and the
other affine ops transform 3 channels with the fill subtracted instead of 4 with a coverage
channel.
"""

import dataclasses
import math

import tensorflow as tf

from pvt_jax.data.errors import DatasetError

FILL_RGB = (124.0, 116.0, 104.0)  # timm img_mean: round(255 * ImageNet mean)
_MAX_LEVEL = 10.0


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  magnitude_max: float = _MAX_LEVEL
  prob: float = 0.5


def parse(spec: str) -> RandAugmentSpec:
  """timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (keys m, n, mstd, mmax, p, inc1)."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise DatasetError(f"randaugment {spec!r} must start with 'rand-' (e.g. "
                       f"'rand-m9-mstd0.5-inc1')")
  fields, increasing = {}, False
  keys = {"m": "magnitude", "n": "num_layers", "mstd": "magnitude_std", "mmax": "magnitude_max",
          "p": "prob"}
  for part in parts[1:]:
    key = part.rstrip("0123456789.")
    try:
      value = float(part[len(key):])
    except ValueError:
      raise DatasetError(f"randaugment {spec!r}: cannot read {part!r}") from None
    if key == "inc":
      increasing = value == 1
    elif key in keys:
      fields[keys[key]] = int(value) if key == "n" else value
    else:
      raise DatasetError(f"randaugment {spec!r}: unknown part {part!r} (known: m, n, mstd, "
                         f"mmax, p, inc)")
  if not increasing:
    raise DatasetError(f"randaugment {spec!r}: only timm's increasing op set is implemented; "
                       f"add '-inc1'")
  return RandAugmentSpec(**fields)


def _trunc_u8(x):
  """PIL's float -> uint8 store: truncate and clip."""
  return tf.clip_by_value(tf.floor(x), 0.0, 255.0)


def _grey(image):
  """PIL 'L' conversion (ITU-R 601-2 luma, 16-bit fixed point with rounding), [H, W, 1]."""
  weights = tf.constant([19595.0, 38470.0, 7471.0])
  return tf.floor((tf.reduce_sum(image * weights, -1, keepdims=True) + 32768.0) / 65536.0)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), truncated to uint8."""
  return _trunc_u8(degenerate + factor * (image - degenerate))


def _select(condition, if_true, if_false):
  """tf.where as arithmetic (see the module docstring): if_false + mask * (if_true - if_false)."""
  return if_false + tf.cast(condition, tf.float32) * (if_true - if_false)


def auto_contrast(image):
  lo = tf.reduce_min(image, axis=(0, 1))
  hi = tf.reduce_max(image, axis=(0, 1))
  # A flat channel stays as it is: offset 0, scale 1 (the images hold whole numbers).
  stretch = hi > lo
  scale = tf.where(stretch, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  return _trunc_u8((image - tf.where(stretch, lo, 0.0)) * scale)


def _equalize_channel(channel):
  """PIL ImageOps.equalize on one channel [H, W]."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(hist) - nonzero[-1]) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.where(step > 0, tf.cast(tf.minimum(lut, 255), tf.float32), tf.range(256.0))
  return tf.gather(lut, values)


def equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  shift = tf.cast(8 - bits, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift),
                                       shift), tf.float32)


def solarize(image, threshold):
  return _select(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  return _select(image < threshold, tf.minimum(image + addition, 255.0), image)


def color(image, factor):
  return _blend(tf.tile(_grey(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(0.0, image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (kernel 1 1 1 / 1 5 1 / 1 1 1, / 13); borders unfiltered."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  smooth = tf.pad(smooth - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]]) + image
  return _blend(smooth, image, factor)


def pil_affine(image, coefficients):
  """PIL Image.transform(AFFINE, (a, b, c, d, e, f)) with timm's fill colour.

  PIL maps output pixel centres (x + .5, y + .5) to input (a x + b y + c, d x + e y + f);
  converted to TF's pixel-index convention. The fill colour is per channel while TF fills with
  one scalar, so the image minus the fill is transformed with fill 0 and the fill added back:
  bilinear weights sum to one, so this equals blending the fill in by the outside taps' weight.
  """
  a, b, c, d, e, f = coefficients
  shape = tf.shape(image)
  transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5, 0.0, 0.0])
  fill = tf.constant(FILL_RGB)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=tf.cast(transform, tf.float32)[None],
      output_shape=shape[:2], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return _trunc_u8(out + fill + 0.5)


def translate(image, pixels, axis: int):
  """pil_affine's translation by `pixels` along `axis` (1: x, 0: y), as a blend of two shifted
  slices of the fill-padded image (bilinear sampling of a shift is exactly that)."""
  fill = tf.constant(FILL_RGB)
  size = tf.shape(image)[axis]
  whole = tf.cast(tf.floor(pixels), tf.int32)
  frac = pixels - tf.floor(pixels)
  # Past a full image width every tap is outside: clamp the shift there (all fill).
  whole = tf.clip_by_value(whole, -size - 1, size)
  pad = [[0, 0], [0, 0], [0, 0]]
  pad[axis] = [size + 1, size + 2]
  padded = tf.pad(image - fill, pad)
  begin = [0, 0, 0]
  begin[axis] = size + 1 + whole
  shape = tf.unstack(tf.shape(image))
  first = tf.slice(padded, tf.stack(begin), tf.stack(shape))
  begin[axis] += 1
  second = tf.slice(padded, tf.stack(begin), tf.stack(shape))
  return _trunc_u8(first * (1.0 - frac) + second * frac + fill + 0.5)


def rotate(image, degrees):
  """PIL Image.rotate(degrees) about the image centre (counter-clockwise for positive)."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  return pil_affine(image, (cos, sin, cos * -cx + sin * -cy + cx,
                            -sin, cos, -sin * -cx + cos * -cy + cy))


def _signed(value, negate):
  return tf.where(negate, -value, value)


def _ops(image, level, negate):
  """The 15 ops of timm's _RAND_INCREASING_TRANSFORMS at `level` in [0, 10], in timm's order."""
  zero, one = tf.constant(0.0), tf.constant(1.0)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  frac = level / _MAX_LEVEL
  enhance = tf.maximum(0.1, 1.0 + _signed(frac * 0.9, negate))
  shear = _signed(frac * 0.3, negate)
  shift = _signed(frac * 0.45, negate)
  return [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      lambda: rotate(image, _signed(frac * 30.0, negate)),
      lambda: posterize(image, 4 - tf.floor(frac * 4)),
      lambda: solarize(image, 256.0 - tf.floor(frac * 256.0)),
      lambda: solarize_add(image, tf.minimum(128.0, tf.floor(frac * 110.0))),
      lambda: color(image, enhance),
      lambda: contrast(image, enhance),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: pil_affine(image, (one, shear, zero, zero, one, zero)),
      lambda: pil_affine(image, (one, zero, zero, shear, one, zero)),
      lambda: translate(image, shift * width, axis=1),
      lambda: translate(image, shift * height, axis=0),
  ]


NUM_OPS = 15


def rand_augment(image, seed, spec: RandAugmentSpec, op_indices=None):
  """Applies `spec` to a float32 [H, W, 3] image with integer values in [0, 255].

  The layers run in a tf.while_loop around one 16-way switch (the 15 ops and the identity for
  an op not applied): a quarter of the graph of unrolled layers with a cond each, which tf.data
  instantiates anew for every epoch's pipeline. `op_indices` (tests) forces each layer's op.
  """
  layer_seeds = tf.random.experimental.stateless_split(seed, spec.num_layers)
  forced = tf.constant(op_indices if op_indices is not None else [-1] * spec.num_layers,
                       tf.int32)

  def layer(index, image):
    s_op, s_apply, s_level, s_sign = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[index], 4))
    op = tf.random.stateless_uniform([], s_op, 0, NUM_OPS, tf.int32)
    op = tf.where(forced[index] >= 0, forced[index], op)
    apply = tf.random.stateless_uniform([], s_apply) <= spec.prob
    level = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([], s_level)
    level = tf.clip_by_value(level, 0.0, spec.magnitude_max)
    negate = tf.random.stateless_uniform([], s_sign) > 0.5
    branches = _ops(image, level, negate) + [lambda: image]
    image = tf.switch_case(tf.where(apply, op, NUM_OPS), branches)
    return index + 1, tf.ensure_shape(image, [None, None, 3])

  _, image = tf.while_loop(lambda index, _: index < spec.num_layers, layer,
                           (tf.constant(0), image))
  return image
