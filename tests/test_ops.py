"""PVT v2's ops against PyTorch's layers and autograd, in every form the model runs: the plain
XLA forms (`pvt_jax.models.ops`, what GPUs and TPUs run) and XLA:CPU's (`pvt_jax.cpu.ops`), with
the C++ kernels and without them (as where no compiler is installed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pvt_jax.cpu import kernels
from pvt_jax.cpu import ops as cpu_ops
from pvt_jax.models import ops

pytestmark = pytest.mark.torch

TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture(params=["plain", "cpu", "cpu_without_kernels"])
def form(request, monkeypatch):
  """The module of one form of the ops (each test jits a fresh function, so it traces anew)."""
  if request.param == "cpu_without_kernels":
    monkeypatch.setattr(kernels, "available", lambda: False)
  return ops if request.param == "plain" else cpu_ops


def _rand(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


# How an array is laid out for PyTorch: maps NHWC -> NCHW, conv kernels HWIO -> OIHW.
_TORCH_AXES = {"map": (0, 3, 1, 2), "kernel": (3, 2, 0, 1)}


def _to_torch(a, layout):
  return torch.from_numpy(np.ascontiguousarray(
      a.transpose(_TORCH_AXES[layout]) if layout in _TORCH_AXES else a))


def _from_torch(t, layout):
  a = t.detach().numpy()
  return a.transpose(np.argsort(_TORCH_AXES[layout])) if layout in _TORCH_AXES else a


def _check(fn, args, layouts, cotangent, torch_fn, grad_tol=1e-4):
  """fn(*args) and its vjp for `cotangent` against torch_fn and its autograd; layouts[i] is the
  layout of args[i] and layouts[-1] that of the output ("same", "map" or "kernel")."""
  out, pull = jax.vjp(jax.jit(fn), *map(jnp.asarray, args))
  grads = pull(jnp.asarray(cotangent))
  leaves = [_to_torch(a, layout).requires_grad_()
            for a, layout in zip(args, layouts[:-1], strict=True)]
  want = torch_fn(*leaves)
  want.backward(_to_torch(cotangent, layouts[-1]))
  np.testing.assert_allclose(out, _from_torch(want, layouts[-1]), **TOL)
  for got, leaf, layout in zip(grads, leaves, layouts[:-1], strict=True):
    scale = float(leaf.grad.abs().max())
    np.testing.assert_allclose(got, _from_torch(leaf.grad, layout), rtol=grad_tol,
                               atol=grad_tol * scale)


# Overlapping embeddings (7x7/4, 3x3/2, odd and tiny maps) and patchifying ones (kernel = stride,
# sizes that leave rows and columns over, which PyTorch's floor division drops).
@pytest.mark.parametrize("k,stride,padding,size", [
    (7, 4, 3, (29, 22)), (3, 2, 1, (9, 8)), (3, 2, 1, (1, 2)), (4, 4, 0, (13, 9)),
    (2, 2, 0, (3, 3)), (1, 1, 0, (5, 4))])
def test_conv2d_matches_torch_forward_and_backward(form, k, stride, padding, size):
  rng = np.random.default_rng(k + stride + size[0])
  cin, cout = (3, 8) if k == 7 else (6, 10)
  x, w, b = _rand(rng, 2, *size, cin), _rand(rng, k, k, cin, cout), _rand(rng, cout)
  oh, ow = ((s + 2 * padding - k) // stride + 1 for s in size)
  g = _rand(rng, 2, oh, ow, cout)
  _check(lambda x, w, b: form.conv2d(x, w, b, stride=stride, padding=padding), (x, w, b),
         ("map", "kernel", "same", "map"), g,
         lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding))


# Both branches of the CPU's kernel gradient (fan-in below and above fan-out), and widths that
# are not multiples of 16.
@pytest.mark.parametrize("fan_in,fan_out", [(8, 32), (32, 8), (16, 16), (30, 45)])
def test_dense_matches_torch_linear_forward_and_backward(form, fan_in, fan_out):
  rng = np.random.default_rng(fan_in)
  x, w, b = _rand(rng, 2, 5, 3, fan_in), _rand(rng, fan_in, fan_out), _rand(rng, fan_out)
  g = _rand(rng, 2, 5, 3, fan_out)
  _check(form.dense, (x, w, b), ("same",) * 4, g, lambda x, w, b: F.linear(x, w.T, b))


def _torch_ffn_hidden(relu):
  def hidden(x, fc1_w, fc1_b, dw_w, dw_b):
    h = F.linear(x, fc1_w.T, fc1_b)
    h = F.relu(h) if relu else h
    h = F.conv2d(h.permute(0, 3, 1, 2), dw_w, dw_b, padding=1, groups=h.shape[-1])
    return F.gelu(h).permute(0, 2, 3, 1)
  return hidden


# Maps of 108, 2, 24, 98, 110 and 1 pixels (the CPU's XLA form folds its kernel gradient in runs
# of 6, 2, 6, 7, 5, 1); 40 hidden channels = two 16-wide vectors and 8 more in the C++ kernel;
# fc1's bias is added to the pixels, not to the conv's zero padding; B2-Li's ReLU after fc1.
@pytest.mark.parametrize("batch,size,relu", [
    (2, (9, 6), False), (2, (1, 1), False), (2, (4, 3), False), (2, (7, 7), False),
    (2, (5, 11), False), (1, (1, 1), False), (2, (5, 3), True)])
def test_conv_ffn_hidden_matches_torch_forward_and_backward(form, batch, size, relu):
  rng = np.random.default_rng(size[0] * 10 + size[1])
  c, hidden = 8, 40
  args = (_rand(rng, batch, *size, c), _rand(rng, c, hidden, scale=0.3),
          _rand(rng, hidden, scale=0.3), _rand(rng, 3, 3, 1, hidden, scale=0.3),
          _rand(rng, hidden, scale=0.3))
  g = _rand(rng, batch, *size, hidden)
  _check(lambda *a: form.conv_ffn_hidden(*a, relu=relu), args,
         ("same", "same", "same", "kernel", "same", "same"), g, _torch_ffn_hidden(relu))


def _torch_attention(q, kv):
  k, v = kv[:, :, 0], kv[:, :, 1]
  logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
  return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)


# Head dims of 16s (the CPU kernel's) and not; one key; keys past a 16-wide vector; as many keys
# as queries (stage 4); logits in the tens.
@pytest.mark.parametrize("batch,n,heads,d,m,spread", [
    (2, 5, 1, 16, 1, 1.0), (3, 37, 2, 32, 17, 1.0), (1, 40, 2, 16, 40, 1.0),
    (2, 30, 5, 32, 49, 4.0), (2, 9, 2, 8, 7, 1.0)])
def test_attention_matches_torch_forward_and_backward(form, batch, n, heads, d, m, spread):
  rng = np.random.default_rng(n + m)
  q, kv = _rand(rng, batch, n, heads, d), _rand(rng, batch, m, 2, heads, d, scale=spread)
  _check(form.attention, (q, kv), ("same",) * 3, _rand(rng, batch, n, heads, d),
         _torch_attention)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm_matches_torch_forward_and_backward(form, eps):
  rng = np.random.default_rng(6)
  # An offset mean checks that the variance does not lose precision to cancellation.
  x, scale, bias = _rand(rng, 2, 5, 3, 64) * 3 + 10, _rand(rng, 64), _rand(rng, 64)
  _check(lambda x, s, b: form.layer_norm(x, s, b, eps=eps), (x, scale, bias), ("same",) * 4,
         _rand(rng, 2, 5, 3, 64), lambda x, s, b: F.layer_norm(x, (64,), s, b, eps),
         grad_tol=1e-5)


@pytest.mark.parametrize("size", [(56, 56), (7, 7), (13, 20), (1, 1), (3, 5)])
def test_adaptive_avg_pool_matches_torch_bins(size):
  rng = np.random.default_rng(5)
  x = _rand(rng, 2, *size, 4)
  got = ops.adaptive_avg_pool(jnp.asarray(x), 7)
  want = F.adaptive_avg_pool2d(_to_torch(x, "map"), 7)
  np.testing.assert_allclose(got, _from_torch(want, "map"), **TOL)


def test_gelu_is_torch_exact_erf_gelu_with_its_gradient():
  x = np.linspace(-8, 8, 1001, dtype=np.float32)
  np.testing.assert_allclose(ops.gelu(jnp.asarray(x)), F.gelu(torch.from_numpy(x)).numpy(),
                             rtol=1e-6, atol=1e-6)
  tx = torch.from_numpy(x).requires_grad_()
  F.gelu(tx).sum().backward()
  np.testing.assert_allclose(jax.vmap(jax.grad(ops.gelu))(jnp.asarray(x)), tx.grad.numpy(),
                             rtol=1e-6, atol=1e-6)
