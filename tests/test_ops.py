"""pvt_jax.models.ops against PyTorch's own layers and against XLA's reference convolutions."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax import lax

from pvt_jax.models import cpu_kernels, ops
from pvt_jax.models.pvt_v2 import LayerNorm

TOL = dict(rtol=1e-5, atol=2e-5)


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _torch_conv(x_nhwc, kernel_hwio, bias, **kw):
  """F.conv2d on NHWC/HWIO numpy arrays, answered in NHWC."""
  x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
  w = torch.from_numpy(kernel_hwio.transpose(3, 2, 0, 1).copy())
  return F.conv2d(x, w, torch.from_numpy(bias), **kw).numpy().transpose(0, 2, 3, 1)


def _xla_conv(x, kernel, bias, stride, padding, groups=1):
  """XLA's own convolution: the slow-on-CPU reference the fast forms must equal, gradients too."""
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups) + bias


@pytest.mark.parametrize("k,stride,size", [(7, 4, (224, 224)), (7, 4, (31, 18)), (3, 2, (13, 7)),
                                           (3, 2, (1, 1)), (3, 2, (2, 5))])
def test_overlapping_conv_matches_torch(k, stride, size):
  rng = np.random.default_rng(0)
  cin, cout = (3, 8) if k == 7 else (6, 10)
  x, w, b = _rand(rng, 2, *size, cin), _rand(rng, k, k, cin, cout), _rand(rng, cout)
  got = ops.conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride=stride, padding=k // 2)
  want = _torch_conv(x, w, b, stride=stride, padding=k // 2)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("k,size", [(8, (32, 32)), (4, (17, 9)), (2, (3, 3)), (2, (1, 5))])
def test_patchify_conv_matches_torch_including_floor_of_odd_sizes(k, size):
  rng = np.random.default_rng(1)
  x, w, b = _rand(rng, 2, *size, 5), _rand(rng, k, k, 5, 7), _rand(rng, 7)
  if size[0] < k:
    # PyTorch refuses kernels larger than the map; ours gives an empty map like floor division.
    assert ops.patchify_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)).shape[1] == 0
    return
  got = ops.patchify_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
  np.testing.assert_allclose(got, _torch_conv(x, w, b, stride=k), **TOL)


@pytest.mark.parametrize("size", [(56, 56), (7, 11), (1, 1), (2, 1)])
def test_depthwise_conv_gelu_matches_torch(size):
  rng = np.random.default_rng(2)
  c = 12
  x, w, b = _rand(rng, 3, *size, c), _rand(rng, 3, 3, 1, c), _rand(rng, c)
  got = ops.depthwise_conv3x3_gelu(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
  want = F.gelu(torch.from_numpy(_torch_conv(x, w, b, padding=1, groups=c))).numpy()
  np.testing.assert_allclose(got, want, **TOL)


def _grads(f, args, cotangent):
  out, pull = jax.vjp(f, *args)
  return out, pull(cotangent)


# Pixel counts 108, 2, 24, 98, 110 and 1: the kernel gradient folds runs of 6, 2, 6, 7, 5, 1.
# The input bias (fc1's, added inside the op) is added to the pixels, not to the zero padding.
@pytest.mark.parametrize("batch,size", [(2, (9, 6)), (2, (1, 1)), (2, (4, 3)), (2, (7, 7)),
                                        (2, (5, 11)), (1, (1, 1))])
@pytest.mark.parametrize("form", ["cpu_kernel", "xla"])
def test_depthwise_conv_gelu_gradients_match_autodiff_of_xla_grouped_conv(batch, size, form):
  rng = np.random.default_rng(3)
  c = 8
  args = tuple(jnp.asarray(a) for a in (_rand(rng, batch, *size, c), _rand(rng, 3, 3, 1, c),
                                        _rand(rng, c), _rand(rng, c)))
  g = jnp.asarray(_rand(rng, batch, *size, c))
  with cpu_kernels.suspended() if form == "xla" else contextlib.nullcontext():
    out, got = _grads(jax.jit(lambda *a: ops.depthwise_conv3x3_gelu(*a)), args, g)

  def reference(x, w, b, input_bias):
    return jax.nn.gelu(_xla_conv(x + input_bias, w, b, 1, 1, groups=c), approximate=False)

  ref_out, want = _grads(reference, args, g)
  np.testing.assert_allclose(out, ref_out, **TOL)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


# Both branches of the kernel gradient: fan-in below and above fan-out.
@pytest.mark.parametrize("fan_in,fan_out", [(8, 32), (32, 8), (16, 16)])
def test_linear_matches_dense_with_autodiff_gradients(fan_in, fan_out):
  rng = np.random.default_rng(5)
  args = tuple(jnp.asarray(a) for a in (_rand(rng, 2, 5, 3, fan_in), _rand(rng, fan_in, fan_out),
                                        _rand(rng, fan_out)))
  g = jnp.asarray(_rand(rng, 2, 5, 3, fan_out))
  out, got = _grads(ops.linear, args, g)
  dense = nn.Dense(fan_out)
  ref_out, want = _grads(lambda x, w, b: dense.apply({"params": {"kernel": w, "bias": b}}, x),
                         args, g)
  np.testing.assert_allclose(out, ref_out, **TOL)
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,stride,padding,size", [(7, 4, 3, (29, 22)), (3, 2, 1, (9, 8)),
                                                   (3, 2, 1, (1, 2)), (4, 4, 0, (13, 9))])
def test_conv_gradients_match_xla_conv(k, stride, padding, size):
  rng = np.random.default_rng(4)
  args = tuple(jnp.asarray(a) for a in (_rand(rng, 2, *size, 3), _rand(rng, k, k, 3, 5),
                                        _rand(rng, 5)))
  if k == stride and padding == 0:
    fast = ops.patchify_conv
  else:
    def fast(x, w, b):
      return ops.conv2d(x, w, b, stride=stride, padding=padding)
  ref_out = _xla_conv(*args, stride, padding)
  g = jnp.asarray(_rand(rng, *ref_out.shape))
  out, got = _grads(fast, args, g)  # under autodiff: conv2d's im2col forward
  np.testing.assert_allclose(out, ref_out, **TOL)
  _, want = _grads(lambda x, w, b: _xla_conv(x, w, b, stride, padding), args, g)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [(56, 56), (7, 7), (13, 20), (1, 1), (3, 5)])
def test_adaptive_avg_pool_matches_torch_bins(size):
  rng = np.random.default_rng(5)
  x = _rand(rng, 2, *size, 4)
  got = ops.adaptive_avg_pool(jnp.asarray(x), 7)
  want = F.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 7)
  np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), **TOL)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("form", ["cpu_kernel", "xla"])
def test_layer_norm_matches_torch_with_gradients(eps, form):
  rng = np.random.default_rng(6)
  # An offset mean checks that the variance does not lose precision to cancellation.
  x, scale, bias = _rand(rng, 2, 5, 3, 64) * 3 + 10, _rand(rng, 64), _rand(rng, 64)
  g = _rand(rng, 2, 5, 3, 64)
  ln = LayerNorm(eps)
  apply = lambda x, scale, bias: ln.apply({"params": {"scale": scale, "bias": bias}}, x)  # noqa: E731
  with cpu_kernels.suspended() if form == "xla" else contextlib.nullcontext():
    got, vjp = jax.vjp(jax.jit(apply), *map(jnp.asarray, (x, scale, bias)))
    got_grads = vjp(jnp.asarray(g))
  tx, tscale, tbias = (torch.from_numpy(a).requires_grad_() for a in (x, scale, bias))
  want = F.layer_norm(tx, (64,), tscale, tbias, eps)
  want.backward(torch.from_numpy(g))
  np.testing.assert_allclose(got, want.detach().numpy(), **TOL)
  for a, t in zip(got_grads, (tx, tscale, tbias), strict=True):
    np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-5, atol=1e-5 * float(t.grad.abs().max()))


def test_gelu_is_torch_exact_erf_gelu_with_its_gradient():
  x = np.linspace(-8, 8, 1001, dtype=np.float32)
  np.testing.assert_allclose(ops.gelu(jnp.asarray(x)), F.gelu(torch.from_numpy(x)).numpy(),
                             rtol=1e-6, atol=1e-6)
  tx = torch.from_numpy(x).requires_grad_()
  F.gelu(tx).sum().backward()
  np.testing.assert_allclose(jax.vmap(jax.grad(ops.gelu))(jnp.asarray(x)), tx.grad.numpy(),
                             rtol=1e-6, atol=1e-6)
