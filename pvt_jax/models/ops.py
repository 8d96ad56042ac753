"""Convolution and pooling primitives with PyTorch semantics, written for speed on every backend.

PVT v2 uses four kinds of convolution. XLA:CPU runs some of them an order of magnitude slower than
PyTorch when written as `lax.conv_general_dilated` (depthwise and strided convolutions, and their
backward passes), so each is expressed here as the cheapest exact equivalent: shifted
multiply-adds, space-to-depth reshapes and matrix products. All take NHWC maps and HWIO kernels
(Flax's layout) and pad symmetrically like PyTorch (XLA's 'SAME' pads asymmetrically).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax


def conv2d(x, kernel, bias, *, stride: int, padding: int):
  """A dense conv with symmetric zero padding (PyTorch `Conv2d(k, stride, padding)`)."""
  y = lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias.astype(x.dtype)


def patchify_conv(x, kernel, bias):
  """A conv whose kernel equals its stride (no overlap, no padding) as one matrix product.

  Trailing rows/columns that do not fill a whole window are dropped, as PyTorch's floor division
  of the output size does.
  """
  k = kernel.shape[0]
  b, h, w, c = x.shape
  oh, ow = h // k, w // k
  x = x[:, :oh * k, :ow * k, :]
  x = x.reshape(b, oh, k, ow, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, oh, ow, k * k * c)
  return x @ kernel.reshape(k * k * c, -1).astype(x.dtype) + bias.astype(x.dtype)


def _shifted_taps(x, taps):
  """sum_ij x[h + i - 1, w + j - 1] * taps[i, j] with zero padding: the depthwise 3x3 sum."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = xp[:, 0:h, 0:w, :] * taps[0, 0]
  for i in range(3):
    for j in range(3):
      if i or j:
        y = y + xp[:, i:i + h, j:j + w, :] * taps[i, j]
  return y


def _add_tuples(a, b):
  return tuple(u + v for u, v in zip(a, b, strict=True))


@jax.custom_vjp
def _depthwise(x, taps, bias):
  return _shifted_taps(x, taps) + bias


def _depthwise_fwd(x, taps, bias):
  return _depthwise(x, taps, bias), (x, taps)


def _depthwise_bwd(residuals, g):
  # Written out because autodiff of the shifted sum pads nine products and sums them, which
  # XLA:CPU fuses with the transpose feeding fc1's weight gradient into a loop ~10x slower than
  # this: the input gradient is the same depthwise sum of g with the kernel flipped.
  x, taps = residuals
  h, w = x.shape[1], x.shape[2]
  dx = _shifted_taps(g, taps[::-1, ::-1])
  # The nine kernel gradients as one variadic reduction: a single pass over x and g. Nine
  # separate sums make XLA:CPU materialise every shifted copy of x first (3-4x slower). Summing
  # each image's pixels before the batch keeps the (fp32, also for bf16) partial sums short.
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(jnp.float32)
  g32 = g.astype(jnp.float32)
  products = tuple(xp[:, i:i + h, j:j + w, :] * g32 for i in range(3) for j in range(3))
  zeros = tuple(jnp.zeros((), jnp.float32) for _ in products)
  per_image = lax.reduce(products, zeros, _add_tuples, (1, 2))
  dtaps = jnp.stack(per_image).sum(axis=1).reshape(3, 3, -1).astype(taps.dtype)
  return dx, dtaps, jnp.sum(g32, axis=(0, 1, 2)).astype(g.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv3x3(x, kernel, bias):
  """Depthwise 3x3 conv, stride 1, padding 1 (kernel [3, 3, 1, C]) as nine shifted multiply-adds.

  The shifted form is ~10x faster than a grouped convolution on XLA:CPU in both directions and
  computes the same sums.
  """
  return _depthwise(x, kernel[:, :, 0, :].astype(x.dtype), bias.astype(x.dtype))


def _adaptive_pool_matrix(in_size: int, out_size: int):
  """Row i averages PyTorch's bin [floor(i*n/m), ceil((i+1)*n/m)) (bins overlap when m ∤ n)."""
  rows = []
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = math.ceil((i + 1) * in_size / out_size)
    rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(in_size)])
  return jnp.asarray(rows, jnp.float32)


def adaptive_avg_pool(x, out_size: int):
  """PyTorch `AdaptiveAvgPool2d(out_size)` on an NHWC map, as two small averaging matmuls."""
  ph = _adaptive_pool_matrix(x.shape[1], out_size).astype(x.dtype)
  pw = _adaptive_pool_matrix(x.shape[2], out_size).astype(x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)
