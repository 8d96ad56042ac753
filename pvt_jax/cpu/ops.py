"""XLA:CPU's forms of PVT v2's ops: the same functions as `pvt_jax.models.ops`, faster there.

`pvt_jax.models.dispatch` uses these where JAX runs on the CPU. XLA:CPU runs some of the plain
forms an order of magnitude slower than PyTorch (depthwise and strided convolutions and their
backward passes, LayerNorm, attention over few keys), so each is expressed here as the cheapest
exact equivalent: C++ kernels (`kernels`, float32, where they are built), shifted multiply-adds,
space-to-depth reshapes, matrix products, and backward passes of their own. bfloat16 maps, and
all maps when the kernels are unavailable, take XLA forms.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pvt_jax.cpu import kernels
from pvt_jax.models import ops

_INV_SQRT_2PI = 0.3989422804014327


def _kernels_apply(x) -> bool:
  """Whether the C++ kernels take this computation: float32, and built and loaded here."""
  return x.dtype == jnp.float32 and kernels.available()


def conv2d(x, kernel, bias, *, stride: int, padding: int):
  """`ops.conv2d`: one matrix product for a patchifying conv, else `_conv2d`."""
  kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
  if kernel.shape[0] == stride and padding == 0:
    return _patchify_conv(x, kernel, bias)
  return _conv2d(x, kernel, bias, stride, padding)


def _patchify_conv(x, kernel, bias):
  """A conv whose kernel equals its stride (no overlap, no padding) as one matrix product.

  Trailing rows/columns that do not fill a whole window are dropped, as PyTorch's floor division
  of the output size does.
  """
  k = kernel.shape[0]
  b, h, w, c = x.shape
  oh, ow = h // k, w // k
  x = x[:, :oh * k, :ow * k, :]
  x = x.reshape(b, oh, k, ow, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, oh, ow, k * k * c)
  return x @ kernel.reshape(k * k * c, -1) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv2d(x, kernel, bias, stride, padding):
  """XLA's convolution when not differentiated; im2col matrix products in a training step.

  Under autodiff XLA:CPU runs the overlapping patch embeddings' forward and kernel gradient at
  ~15 GFLOP/s. One [pixels, k*k*C_in] patch matrix, built once in the forward pass and kept for
  the kernel gradient, makes both plain matrix products: the conv's forward plus backward takes
  half the time for B0's 7x7/4 stem and 2/3 for its 3x3/2 embedding (measured, batch 16, 224).
  Inference keeps XLA's convolution, which is faster there than building the patch matrix.
  """
  return ops.conv2d(x, kernel, bias, stride=stride, padding=padding)


def _patch_matrix(x, size, stride, padding):
  """[B, OH, OW, size*size*C]: every conv window flattened in the kernel's (row, col, C) order."""
  b, h, w, c = x.shape
  oh, ow = (h + 2 * padding - size) // stride + 1, (w + 2 * padding - size) // stride + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  windows = [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
             for i in range(size) for j in range(size)]
  return jnp.concatenate(windows, axis=-1)


def _conv2d_fwd(x, kernel, bias, stride, padding):
  patches = _patch_matrix(x, kernel.shape[0], stride, padding)
  return patches @ kernel.reshape(-1, kernel.shape[-1]) + bias, (x, kernel, patches)


def _conv2d_bwd(stride, padding, residuals, g):
  x, kernel, patches = residuals
  no_bias = jnp.zeros(kernel.shape[-1], kernel.dtype)
  _, input_gradient = jax.vjp(
      lambda x: ops.conv2d(x, kernel, no_bias, stride=stride, padding=padding), x)
  (dx,) = input_gradient(g)
  dkernel = _weight_gradient(patches.reshape(-1, patches.shape[-1]), g.reshape(-1, g.shape[-1]))
  return dx, dkernel.reshape(kernel.shape), g.sum(axis=(0, 1, 2))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def dense(x, kernel, bias):
  """`ops.dense` with a backward pass for XLA:CPU.

  The kernel gradient is a product over all pixels (`_weight_gradient`), for which XLA:CPU first
  writes one operand out transposed. Autodiff picks the output gradient, 4-8x wider than the
  input in the FFN's fc1; transposing the narrower one made a B0 or B2 train step 10-15% faster.
  """
  return _matmul(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


@jax.custom_vjp
def _matmul(x, kernel):
  return x @ kernel


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
  x, kernel = residuals
  fan_in, fan_out = kernel.shape
  return g @ kernel.T, _weight_gradient(x.reshape(-1, fan_in), g.reshape(-1, fan_out))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _xla_weight_gradient(x2, g2):
  """x2^T g2 over rows, transposing the narrower operand (XLA:CPU copies one out transposed)."""
  over_rows = (((0,), (0,)), ((), ()))
  if x2.shape[1] <= g2.shape[1]:
    return lax.dot_general(x2, g2, over_rows)
  return lax.dot_general(g2, x2, over_rows).T


def _weight_gradient(x2, g2):
  """x2^T g2 summed over all rows (pixels): a dense layer's or a patch-matrix conv's kernel
  gradient.

  Where one side is at most 64 wide (PVT v2's stage-1/2 FFNs, attention projections, the stem),
  a hand-written kernel: 1.4-3x faster than XLA:CPU's product there, which transposes an operand
  first. It vectorises over its second operand, so the wider side (a multiple of 16) goes there.
  Wider products stay XLA's (as fast).
  """
  k, n = x2.shape[1], g2.shape[1]
  if not _kernels_apply(x2) or min(k, n) > 64 or (k % 16 and n % 16):
    return _xla_weight_gradient(x2, g2)
  if n % 16 == 0 and (n >= k or k % 16):
    return kernels.weight_gradient(x2, g2)
  return kernels.weight_gradient(g2, x2).T


def conv_ffn_hidden(x, fc1_kernel, fc1_bias, dw_kernel, dw_bias, *, relu: bool):
  """`ops.conv_ffn_hidden`; without the ReLU the depthwise op adds fc1's bias as it reads the
  map, one pass over the wide hidden map less, each way."""
  taps = dw_kernel[:, :, 0, :].astype(x.dtype)
  dw_bias = dw_bias.astype(x.dtype)
  if relu:
    h = jax.nn.relu(dense(x, fc1_kernel, fc1_bias))
    return _depthwise_gelu(h, taps, dw_bias, jnp.zeros(h.shape[-1], h.dtype))
  h = _matmul(x, fc1_kernel.astype(x.dtype))
  return _depthwise_gelu(h, taps, dw_bias, fc1_bias.astype(x.dtype))


def _gelu_derivative(x):
  return (0.5 * (1.0 + lax.erf(x * ops._SQRT_HALF))
          + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x))


def _shifted_taps(x, taps, reverse=False):
  """sum_ij x[h + i - 1, w + j - 1] * taps[i, j] with zero padding: the depthwise 3x3 sum."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  terms = [xp[:, i:i + h, j:j + w, :] * taps[i, j] for i in range(3) for j in range(3)]
  if reverse:
    terms.reverse()
  return sum(terms[1:], start=terms[0])


def _add_tuples(a, b):
  return tuple(u + v for u, v in zip(a, b, strict=True))


def _tap_gradients(x, g):
  """Gradient of the nine taps: per channel, the sum over pixels of shifted x times g (fp32).

  One variadic reduction reads x and g once for all nine taps. It first folds runs of at most 7
  neighbouring pixels, then the rest: XLA:CPU keeps such short runs in registers, and this is
  5-8x faster there than reducing all pixels in one go (or nine separate sums, which materialise
  every shifted product). Folding runs of 8 or more falls off that fast path for wide maps.
  """
  b, h, w, c = x.shape
  pixels = b * h * w
  run = next(k for k in range(7, 0, -1) if pixels % k == 0)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(jnp.float32)
  g32 = g.astype(jnp.float32)
  products = tuple((xp[:, i:i + h, j:j + w, :] * g32).reshape(pixels // run, run, c)
                   for i in range(3) for j in range(3))
  zeros = tuple(jnp.zeros((), jnp.float32) for _ in products)
  runs = lax.reduce(products, zeros, _add_tuples, (1,))
  return jnp.stack([r.sum(axis=0) for r in runs]).reshape(3, 3, c)


def _xla_depthwise_gelu(x, taps, bias, input_bias):
  """GELU(depthwise 3x3 conv of (x + input_bias), + bias) as nine shifted multiply-adds fused
  with the GELU: ~10x faster than a grouped convolution on XLA:CPU in both directions."""
  return ops.gelu(_shifted_taps(x + input_bias, taps) + bias)


def _xla_depthwise_gelu_backward(x, taps, bias, input_bias, g):
  # Written out for memory traffic, which bounds these wide maps on CPU: the pre-activation is
  # recomputed from x (the same reads as loading a stored copy, minus a write and its memory),
  # and the input gradient is the same shifted sum of the incoming gradient with the kernel
  # flipped (autodiff instead pads nine products and sums them). The recomputation adds the taps
  # in the opposite order: not an expression XLA merges with the forward's, which would make
  # the forward a second pass over the map to hand its erf over (1-6% faster per FFN, measured).
  x = x + input_bias
  grad_pre = g * _gelu_derivative(_shifted_taps(x, taps, reverse=True) + bias)
  dx = _shifted_taps(grad_pre, taps[::-1, ::-1])
  dtaps = _tap_gradients(x, grad_pre).astype(taps.dtype)
  dbias = jnp.sum(grad_pre.astype(jnp.float32), axis=(0, 1, 2)).astype(bias.dtype)
  dinput_bias = jnp.sum(dx.astype(jnp.float32), axis=(0, 1, 2)).astype(input_bias.dtype)
  return dx, dtaps, dbias, dinput_bias


@jax.custom_vjp
def _depthwise_gelu(x, taps, bias, input_bias):
  """GELU(depthwise 3x3 conv of (x + input_bias) with taps [3, 3, C], + bias): the C++ kernel
  (4-15x faster backward than the XLA form) where it applies, else the XLA form. `input_bias`
  is added to the pixels, not to the zero padding."""
  form = kernels.depthwise_gelu if _kernels_apply(x) else _xla_depthwise_gelu
  return form(x, taps, bias, input_bias)


def _depthwise_gelu_fwd(x, taps, bias, input_bias):
  return _depthwise_gelu(x, taps, bias, input_bias), (x, taps, bias, input_bias)


def _depthwise_gelu_bwd(residuals, g):
  x = residuals[0]
  form = kernels.depthwise_gelu_backward if _kernels_apply(x) else _xla_depthwise_gelu_backward
  return form(*residuals, g)


_depthwise_gelu.defvjp(_depthwise_gelu_fwd, _depthwise_gelu_bwd)


def attention(q, kv):
  """`ops.attention`: for float32 and head dims of 16s the C++ kernel, 1.7-2.8x faster forward
  and 1.3-2.3x backward than XLA:CPU's two batched products and softmax (PVT v2's stage shapes,
  batch 16)."""
  if q.shape[-1] % 16 or not _kernels_apply(q):
    return ops.attention(q, kv)
  return _kernel_attention(q, kv)


@jax.custom_vjp
def _kernel_attention(q, kv):
  return kernels.attention(q, kv)


def _kernel_attention_fwd(q, kv):
  return _kernel_attention(q, kv), (q, kv)


def _kernel_attention_bwd(residuals, g):
  return kernels.attention_backward(*residuals, g)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def layer_norm(x, scale, bias, *, eps: float):
  """`ops.layer_norm`: for float32 the C++ kernel, one pass over the map each way (XLA:CPU makes
  several of a LayerNorm's forward and backward: 3-4x slower at PVT v2's widths)."""
  if not _kernels_apply(x):
    return ops.layer_norm(x, scale, bias, eps=eps)
  rows = x.reshape(-1, x.shape[-1])
  return _kernel_layer_norm(rows, scale.astype(x.dtype), bias.astype(x.dtype), eps).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_layer_norm(x, scale, bias, eps):
  return kernels.layer_norm(x, scale, bias, eps)


def _kernel_layer_norm_fwd(x, scale, bias, eps):
  return _kernel_layer_norm(x, scale, bias, eps), (x, scale)


def _kernel_layer_norm_bwd(eps, residuals, g):
  return kernels.layer_norm_backward(*residuals, g, eps)


_kernel_layer_norm.defvjp(_kernel_layer_norm_fwd, _kernel_layer_norm_bwd)
