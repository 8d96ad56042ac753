"""Convolution and pooling primitives with PyTorch semantics, written for speed on every backend.

PVT v2 uses four kinds of convolution. XLA:CPU runs some of them an order of magnitude slower than
PyTorch when written as `lax.conv_general_dilated` (depthwise and strided convolutions, and their
backward passes), so each is expressed here as the cheapest exact equivalent: shifted
multiply-adds, space-to-depth reshapes and matrix products. All take NHWC maps and HWIO kernels
(Flax's layout) and pad symmetrically like PyTorch (XLA's 'SAME' pads asymmetrically). `linear`
(the blocks' dense layer) and `conv2d` have backward passes of their own for the same reason.
On CPU in float32, the FFN's depthwise conv + GELU, the attention core, LayerNorm and narrow
weight gradients run as C++ kernels (`cpu_kernels`), selected per backend: XLA:GPU/TPU compile
the same math well by themselves.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pvt_jax.models import cpu_kernels


def conv2d(x, kernel, bias, *, stride: int, padding: int):
  """A dense conv with symmetric zero padding (PyTorch `Conv2d(k, stride, padding)`)."""
  return _conv2d(x, kernel.astype(x.dtype), bias.astype(x.dtype), stride, padding)


def _xla_conv2d(x, kernel, stride, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv2d(x, kernel, bias, stride, padding):
  """XLA's convolution when not differentiated; im2col matrix products in a training step.

  Under autodiff XLA:CPU runs the overlapping patch embeddings' forward and kernel gradient at
  ~15 GFLOP/s. One [pixels, k*k*C_in] patch matrix, built once in the forward pass and kept for
  the kernel gradient, makes both plain matrix products: the conv's forward plus backward takes
  half the time for B0's 7x7/4 stem and 2/3 for its 3x3/2 embedding (measured, batch 16, 224).
  Inference keeps XLA's convolution, which is faster there than building the patch matrix.
  """
  return _xla_conv2d(x, kernel, stride, padding) + bias


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
  transpose = jax.linear_transpose(lambda x: _xla_conv2d(x, kernel, stride, padding), x)
  (dx,) = transpose(g)
  dkernel = _weight_gradient(patches.reshape(-1, patches.shape[-1]), g.reshape(-1, g.shape[-1]))
  return dx, dkernel.reshape(kernel.shape), g.sum(axis=(0, 1, 2))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


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


def linear(x, kernel, bias=None):
  """x @ kernel (+ bias) over the last axis: `nn.Dense`'s numbers, with a backward pass for
  XLA:CPU.

  The kernel gradient is a product over all pixels (`_weight_gradient`), for which XLA:CPU first
  writes one operand out transposed. Autodiff picks the output gradient, 4-8x wider than the
  input in the FFN's fc1; transposing the narrower one made a B0 or B2 train step 10-15% faster.
  """
  y = _matmul(x, kernel)
  return y if bias is None else y + bias


@jax.custom_vjp
def _matmul(x, kernel):
  return x @ kernel


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _xla_weight_gradient(x2, g2):
  """x2^T g2 over rows, transposing the narrower operand (XLA:CPU copies one out transposed)."""
  over_rows = (((0,), (0,)), ((), ()))
  if x2.shape[1] <= g2.shape[1]:
    return lax.dot_general(x2, g2, over_rows)
  return lax.dot_general(g2, x2, over_rows).T


def _weight_gradient(x2, g2):
  """x2^T g2 summed over all rows (pixels): a dense layer's or a patch-matrix conv's kernel
  gradient.

  On CPU (float32), where one side is at most 64 wide (PVT v2's stage-1/2 FFNs, attention
  projections, the stem), a hand-written kernel (`cpu_kernels`): 1.4-3x faster than XLA:CPU's
  product there, which transposes an operand first. It vectorises over its second operand,
  so the wider side (a multiple of 16) goes there. Wider products stay XLA's (as fast).
  """
  k, n = x2.shape[1], g2.shape[1]
  if min(k, n) > 64 or (k % 16 and n % 16):
    return _xla_weight_gradient(x2, g2)
  if n % 16 == 0 and (n >= k or k % 16):
    kernel = cpu_kernels.weight_gradient
  else:
    kernel = lambda x2, g2: cpu_kernels.weight_gradient(g2, x2).T  # noqa: E731
  return _per_backend(x2, kernel, _xla_weight_gradient, x2, g2)


def _matmul_bwd(residuals, g):
  x, kernel = residuals
  fan_in, fan_out = kernel.shape
  return g @ kernel.T, _weight_gradient(x.reshape(-1, fan_in), g.reshape(-1, fan_out))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def gelu(x):
  """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), computed as `torch.nn.GELU()` computes it.

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU runs ~5x slower than erf.
  """
  return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF))


def _gelu_derivative(x):
  return 0.5 * (1.0 + lax.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


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
  return gelu(_shifted_taps(x + input_bias, taps) + bias)


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


def _cpu_kernels_apply(x) -> bool:
  """Whether XLA:CPU runs this float32 computation and the C++ kernels are built and on."""
  return x.dtype == jnp.float32 and cpu_kernels.enabled()


def _per_backend(x, cpu_kernel, xla_form, *args):
  """`cpu_kernel` where `_cpu_kernels_apply`, else (other backends, bfloat16) XLA's form."""
  if not _cpu_kernels_apply(x):
    return xla_form(*args)
  return lax.platform_dependent(*args, cpu=cpu_kernel, default=xla_form)


@jax.custom_vjp
def _depthwise_gelu(x, taps, bias, input_bias):
  return _per_backend(x, cpu_kernels.depthwise_gelu, _xla_depthwise_gelu, x, taps, bias,
                      input_bias)


def _depthwise_gelu_fwd(x, taps, bias, input_bias):
  return _depthwise_gelu(x, taps, bias, input_bias), (x, taps, bias, input_bias)


def _depthwise_gelu_bwd(residuals, g):
  return _per_backend(residuals[0], cpu_kernels.depthwise_gelu_backward,
                      _xla_depthwise_gelu_backward, *residuals, g)


_depthwise_gelu.defvjp(_depthwise_gelu_fwd, _depthwise_gelu_bwd)


def depthwise_conv3x3_gelu(x, kernel, bias, input_bias=None):
  """GELU(depthwise 3x3 conv, stride 1, padding 1) (kernel [3, 3, 1, C]), as in PVT v2's FFN.

  `input_bias` [C], if given, is added to x first (not to the padding): the FFN passes fc1's
  bias here, so that no separate pass over the wide hidden map adds it (or sums its gradient).
  On CPU (float32) a hand-written kernel (`cpu_kernels`); elsewhere, and where it cannot be
  built, nine shifted multiply-adds: ~10x faster than a grouped convolution on XLA:CPU in both
  directions, the same sums, and fused with the GELU that always follows it.
  """
  if input_bias is None:
    input_bias = jnp.zeros(x.shape[-1], x.dtype)
  return _depthwise_gelu(x, kernel[:, :, 0, :].astype(x.dtype), bias.astype(x.dtype),
                         input_bias.astype(x.dtype))


def attention_probabilities(q, k):
  """softmax(q k^T / sqrt(D)) per head, in float32: q [B, N, H, D], k [B, M, H, D] -> B H N M."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1]**-0.5, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)


def _xla_attention(q, kv):
  probs = attention_probabilities(q, kv[:, :, 0])
  return jnp.einsum("bhqk,bkhd->bqhd", probs, kv[:, :, 1])


def attention(q, kv):
  """softmax(q k^T / sqrt(D)) v per head: q [B, N, H, D], kv [B, M, 2, H, D] (keys, values).

  On CPU (float32, D a multiple of 16) a hand-written kernel (`cpu_kernels`): 1.7-2.8x faster
  forward and 1.3-2.3x backward than XLA:CPU's two batched products and softmax (PVT v2's
  stage shapes, batch 16); elsewhere exactly those.
  """
  if q.shape[-1] % 16 or not _cpu_kernels_apply(q):
    return _xla_attention(q, kv)
  return _kernel_attention(q, kv)


@jax.custom_vjp
def _kernel_attention(q, kv):
  return lax.platform_dependent(q, kv, cpu=cpu_kernels.attention, default=_xla_attention)


def _kernel_attention_fwd(q, kv):
  return _kernel_attention(q, kv), (q, kv)


def _xla_attention_backward(q, kv, g):
  return jax.vjp(_xla_attention, q, kv)[1](g)


def _kernel_attention_bwd(residuals, g):
  return lax.platform_dependent(*residuals, g, cpu=cpu_kernels.attention_backward,
                                default=_xla_attention_backward)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _xla_layer_norm(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  centered = x32 - x32.mean(axis=-1, keepdims=True)
  rstd = lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
  return (centered * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
  """LayerNorm over the last axis with PyTorch's two-pass statistics (in float32), * scale + bias.

  On CPU (float32) a hand-written kernel (`cpu_kernels`), one pass over the map each way:
  XLA:CPU makes several of a LayerNorm's forward and backward (3-4x slower at PVT v2's widths);
  elsewhere the same math traced for XLA.
  """
  if not _cpu_kernels_apply(x):
    return _xla_layer_norm(x, scale, bias, eps)
  rows = x.reshape(-1, x.shape[-1])
  return _kernel_layer_norm(rows, scale.astype(x.dtype), bias.astype(x.dtype), eps).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_layer_norm(x, scale, bias, eps):
  return lax.platform_dependent(x, scale, bias,
                                cpu=functools.partial(cpu_kernels.layer_norm, eps=eps),
                                default=functools.partial(_xla_layer_norm, eps=eps))


def _kernel_layer_norm_fwd(x, scale, bias, eps):
  return _kernel_layer_norm(x, scale, bias, eps), (x, scale)


def _xla_layer_norm_backward(x, scale, g, eps):
  norm = lambda x, scale, bias: _xla_layer_norm(x, scale, bias, eps)  # noqa: E731
  return jax.vjp(norm, x, scale, jnp.zeros_like(scale))[1](g)


def _kernel_layer_norm_bwd(eps, residuals, g):
  return lax.platform_dependent(
      *residuals, g, cpu=functools.partial(cpu_kernels.layer_norm_backward, eps=eps),
      default=functools.partial(_xla_layer_norm_backward, eps=eps))


_kernel_layer_norm.defvjp(_kernel_layer_norm_fwd, _kernel_layer_norm_bwd)


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
