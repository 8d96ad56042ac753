"""PVT v2's ops in their plain XLA form, with the numerics parity with PyTorch needs.

What differs from the first thing one would write: convolutions pad symmetrically like PyTorch
(XLA's 'SAME' pads asymmetrically), GELU is the exact erf form `torch.nn.GELU()` computes,
LayerNorm takes PyTorch's two-pass statistics in float32, and adaptive pooling uses PyTorch's
(overlapping) bins. All maps are NHWC, kernels HWIO (Flax's layout), and parameters are cast to
the input's (compute) dtype.

This is what GPUs and TPUs run. On the CPU, `dispatch` swaps some of these ops for the forms in
`pvt_jax.cpu.ops`, which compute the same function.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SQRT_HALF = 0.7071067811865476


def conv2d(x, kernel, bias, *, stride: int, padding: int):
  """PyTorch `Conv2d(k, stride, padding)`: a dense conv with symmetric zero padding."""
  y = lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(stride, stride),
                               padding=((padding, padding), (padding, padding)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias.astype(x.dtype)


def depthwise_conv3x3(x, kernel, bias):
  """PyTorch `Conv2d(C, C, 3, padding=1, groups=C)`; kernel [3, 3, 1, C]."""
  y = lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(1, 1),
                               padding=((1, 1), (1, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=x.shape[-1])
  return y + bias.astype(x.dtype)


def dense(x, kernel, bias):
  """x @ kernel + bias over the last axis (`nn.Dense`)."""
  return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


def gelu(x):
  """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), computed as `torch.nn.GELU()` computes it."""
  return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF))


def conv_ffn_hidden(x, fc1_kernel, fc1_bias, dw_kernel, dw_bias, *, relu: bool):
  """The hidden layer of PVT v2's ConvFFN: GELU(dwconv([ReLU](fc1(x)))), with fc1 a dense layer
  [C, hidden] and dwconv the 3x3 depthwise conv [3, 3, 1, hidden]. One op, so that a backend's
  form may fuse across its parts (the CPU's adds fc1's bias inside the depthwise kernel)."""
  h = dense(x, fc1_kernel, fc1_bias)
  if relu:
    h = jax.nn.relu(h)
  return gelu(depthwise_conv3x3(h, dw_kernel, dw_bias))


def attention_probabilities(q, k):
  """softmax(q k^T / sqrt(D)) per head, in float32: q [B, N, H, D], k [B, M, H, D] -> B H N M."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1]**-0.5, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)


def attention(q, kv):
  """softmax(q k^T / sqrt(D)) v per head: q [B, N, H, D], kv [B, M, 2, H, D] (keys, values)."""
  probs = attention_probabilities(q, kv[:, :, 0])
  return jnp.einsum("bhqk,bkhd->bqhd", probs, kv[:, :, 1])


def layer_norm(x, scale, bias, *, eps: float):
  """LayerNorm over the last axis, PyTorch's two-pass statistics (in float32), * scale + bias."""
  x32 = x.astype(jnp.float32)
  centered = x32 - x32.mean(axis=-1, keepdims=True)
  rstd = lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
  return (centered * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


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


def _bilinear_matrix(in_size: int, out_size: int):
  """PyTorch's bilinear weights (align_corners=False): output i samples the input at
  (i + 0.5) * in / out - 0.5, clamped at 0, between its two neighbours (the last one repeats).
  Computed in float32 as PyTorch does: float64 weights would differ from its results by ~1e-5."""
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  rows = np.zeros((out_size, in_size), f32)
  for i in range(out_size):
    source = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
    low = min(int(np.floor(source)), in_size - 1)
    fraction = min(max(source - f32(low), f32(0.0)), f32(1.0))
    high = min(low + 1, in_size - 1)
    rows[i, low] += f32(1.0) - fraction
    rows[i, high] += fraction
  return jnp.asarray(rows)


def bilinear_resize(x, size: tuple[int, int]):
  """`F.interpolate(x, size, mode="bilinear")` (no antialiasing) of an [H, W, C] map, as two
  interpolation matmuls; jax.image.resize antialiases when shrinking, PyTorch does not."""
  rh = _bilinear_matrix(x.shape[0], size[0]).astype(x.dtype)
  rw = _bilinear_matrix(x.shape[1], size[1]).astype(x.dtype)
  return jnp.einsum("ih,jw,hwc->ijc", rh, rw, x)
