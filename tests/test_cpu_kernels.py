"""The C++ CPU kernels: built and cached, chosen by `dispatch` on CPU, exact against the XLA
forms, deterministic, per-shard under sharding, and a clean fallback when they cannot be built.
(`test_ops` checks every form of the ops against PyTorch; `test_parity` the whole model's
gradients against timm's autograd.)"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvt_jax import cpu
from pvt_jax.cpu import kernels
from pvt_jax.cpu import ops as cpu_ops
from pvt_jax.models import dispatch, ops


def _compiled_text(f, *args):
  return jax.jit(f).lower(*args).compile().as_text()


def _arrays(rng, batch, h, w, c):
  """x, taps, bias, input bias and an output gradient for the depthwise conv + GELU."""
  x, g = (rng.standard_normal((batch, h, w, c)).astype(np.float32) for _ in range(2))
  taps = (0.3 * rng.standard_normal((3, 3, c))).astype(np.float32)
  bias, input_bias = ((0.1 * rng.standard_normal(c)).astype(np.float32) for _ in range(2))
  return tuple(map(jnp.asarray, (x, taps, bias, input_bias, g)))


def _ffn_hidden(x, taps, bias):
  """The FFN's hidden layer through `dispatch`, with an identity fc1 and the given conv."""
  c = x.shape[-1]
  return dispatch.conv_ffn_hidden(x, jnp.eye(c), jnp.zeros(c), taps[:, :, None, :], bias,
                                  relu=False)


def test_kernels_build_here_and_the_dispatch_uses_them_on_cpu():
  assert kernels.available()
  x, taps, bias, _, _ = _arrays(np.random.default_rng(0), 2, 5, 6, 32)
  loss = lambda x: _ffn_hidden(x, taps, bias).sum()  # noqa: E731
  assert 'custom_call_target="pvt_depthwise_gelu"' in _compiled_text(
      lambda x: _ffn_hidden(x, taps, bias), x)
  assert 'custom_call_target="pvt_depthwise_gelu_backward"' in _compiled_text(jax.grad(loss), x)
  # bfloat16 maps keep the XLA form (the kernels are float32).
  assert "pvt_depthwise_gelu" not in _compiled_text(
      lambda x: _ffn_hidden(x, taps, bias), x.astype(jnp.bfloat16))


# Batch 1 with 37 rows splits each image into chunks (halo rows recomputed at their borders);
# 40 channels = two 16-wide blocks + 8 left over; 1x1, single-row/column and empty maps.
@pytest.mark.parametrize("batch,h,w,c", [(1, 37, 9, 40), (3, 7, 5, 48), (2, 1, 1, 16),
                                         (2, 1, 6, 17), (4, 6, 1, 64), (2, 0, 3, 16)])
def test_kernels_equal_the_xla_form_forward_and_backward(batch, h, w, c):
  x, taps, bias, input_bias, g = _arrays(np.random.default_rng(c), batch, h, w, c)
  np.testing.assert_allclose(kernels.depthwise_gelu(x, taps, bias, input_bias),
                             cpu_ops._xla_depthwise_gelu(x, taps, bias, input_bias),
                             rtol=1e-6, atol=1e-6)
  got = kernels.depthwise_gelu_backward(x, taps, bias, input_bias, g)
  want = cpu_ops._xla_depthwise_gelu_backward(x, taps, bias, input_bias, g)
  for name, a, b in zip(("dx", "dtaps", "dbias", "dinput_bias"), got, want, strict=True):
    scale = float(jnp.abs(b).max(initial=1.0))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=name)


def _attention_arrays(rng, batch, n, heads, d, m, spread=1.0):
  q, g = (jnp.asarray(rng.standard_normal((batch, n, heads, d)), jnp.float32) for _ in range(2))
  kv = jnp.asarray(spread * rng.standard_normal((batch, m, 2, heads, d)), jnp.float32)
  return q, kv, g


def test_attention_uses_the_kernel_for_float32_and_head_dims_of_16s():
  q, kv, g = _attention_arrays(np.random.default_rng(3), 2, 10, 2, 32, 7)
  assert 'custom_call_target="pvt_attention"' in _compiled_text(dispatch.attention, q, kv)
  backward = lambda q, kv: jax.vjp(dispatch.attention, q, kv)[1](g)  # noqa: E731
  assert 'custom_call_target="pvt_attention_backward"' in _compiled_text(backward, q, kv)
  assert "pvt_attention" not in _compiled_text(dispatch.attention, q[..., :8], kv[..., :8])
  assert "pvt_attention" not in _compiled_text(dispatch.attention, q.astype(jnp.bfloat16),
                                               kv.astype(jnp.bfloat16))


# One key (softmax = 1), 17 keys (a 16-wide vector plus one, the rest padding), as many keys as
# queries (stage 4, sr_ratio 1), a batch of one split into query chunks, logits in the hundreds,
# no queries at all.
@pytest.mark.parametrize("batch,n,heads,d,m,spread", [
    (2, 5, 1, 16, 1, 1.0), (3, 37, 2, 32, 17, 1.0), (1, 300, 2, 64, 300, 1.0),
    (1, 200, 1, 32, 49, 1.0), (2, 30, 5, 32, 49, 30.0), (2, 0, 1, 16, 4, 1.0)])
def test_attention_kernel_equals_the_xla_form_forward_and_backward(batch, n, heads, d, m, spread):
  q, kv, g = _attention_arrays(np.random.default_rng(m), batch, n, heads, d, m, spread)
  np.testing.assert_allclose(kernels.attention(q, kv), ops.attention(q, kv),
                             rtol=0, atol=2e-6 * spread)
  got = kernels.attention_backward(q, kv, g)
  want = jax.vjp(ops.attention, q, kv)[1](g)
  for name, a, b in zip(("dq", "dkv"), got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max(initial=1.0)),
                               err_msg=name)


def _norm_arrays(rng, rows, c, offset=0.0):
  x, g = (rng.standard_normal((rows, c)).astype(np.float32) for _ in range(2))
  scale, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
  return jnp.asarray(x + offset), jnp.asarray(scale), jnp.asarray(bias), jnp.asarray(g)


def test_layer_norm_uses_the_kernel_for_float32():
  x, scale, bias, g = _norm_arrays(np.random.default_rng(5), 12, 32)
  x = x.reshape(2, 3, 2, 32)
  norm = lambda x: dispatch.layer_norm(x, scale, bias, eps=1e-6)  # noqa: E731
  assert 'custom_call_target="pvt_layer_norm"' in _compiled_text(norm, x)
  backward = lambda x: jax.vjp(norm, x)[1](g.reshape(x.shape))  # noqa: E731
  assert 'custom_call_target="pvt_layer_norm_backward"' in _compiled_text(backward, x)
  assert "pvt_layer_norm" not in _compiled_text(norm, x.astype(jnp.bfloat16))


# One row; more rows than one chunk of partial sums (256) with 17 channels (a vector + 1); three
# chunks of 320; one channel (zero variance); no rows; a large mean over a small spread (x then
# holds ~1e-5 of the spread: the tolerance scales with it, still 50x below one-pass statistics
# error there).
@pytest.mark.parametrize("rows,c,offset", [(1, 16, 0.0), (300, 17, 0.0), (600, 320, 0.0),
                                           (5, 1, 0.0), (0, 8, 0.0), (70, 64, 300.0)])
def test_layer_norm_kernel_equals_the_xla_form_forward_and_backward(rows, c, offset):
  x, scale, bias, g = _norm_arrays(np.random.default_rng(rows), rows, c, offset)
  tolerance = 2e-6 * (1.0 + offset)
  norm = lambda x, scale, bias: ops.layer_norm(x, scale, bias, eps=1e-5)  # noqa: E731
  np.testing.assert_allclose(kernels.layer_norm(x, scale, bias, 1e-5), norm(x, scale, bias),
                             rtol=0, atol=tolerance)
  got = kernels.layer_norm_backward(x, scale, g, 1e-5)
  want = jax.vjp(norm, x, scale, bias)[1](g)
  for name, a, b in zip(("dx", "dscale", "dbias"), got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, err_msg=name,
                               atol=tolerance * float(jnp.abs(b).max(initial=1.0)))


def test_weight_gradients_use_the_kernel_where_one_side_is_narrow():
  rng = np.random.default_rng(7)

  def kernel_gradient_hlo(fan_in, fan_out):
    x = jnp.asarray(rng.standard_normal((2, 9, fan_in)), jnp.float32)
    kernel, bias = jnp.zeros((fan_in, fan_out)), jnp.zeros(fan_out)
    return _compiled_text(jax.grad(lambda k: (dispatch.dense(x, k, bias) ** 2).sum()), kernel)

  assert 'custom_call_target="pvt_weight_gradient"' in kernel_gradient_hlo(32, 256)
  assert 'custom_call_target="pvt_weight_gradient"' in kernel_gradient_hlo(256, 32)
  assert 'custom_call_target="pvt_weight_gradient"' in kernel_gradient_hlo(147, 64)  # the stem
  assert "pvt_weight_gradient" not in kernel_gradient_hlo(128, 512)  # XLA's is as fast
  assert "pvt_weight_gradient" not in kernel_gradient_hlo(30, 45)  # neither side 16s


# No rows; K not a multiple of the 6-row tile; the stem's 147 x 64; 3 and 5 vectors of columns;
# a result large enough that the rows are split into fewer parts (and columns into bands).
@pytest.mark.parametrize("m,k,n", [(0, 8, 16), (1000, 7, 48), (700, 147, 64), (300, 13, 80),
                                   (600, 96, 2304)])
def test_weight_gradient_kernel_equals_the_xla_product(m, k, n):
  rng = np.random.default_rng(m + k)
  x, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((m, k), (m, n)))
  want = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
  got = kernels.weight_gradient(x, g)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))


def test_attention_dropout_in_training_keeps_the_xla_form():
  from pvt_jax.models.pvt_v2 import SpatialReductionAttention
  x = jnp.ones((1, 8, 8, 32))
  layer = SpatialReductionAttention(dim=32, num_heads=1, sr_ratio=2, attn_drop_rate=0.5)
  params = layer.init(jax.random.key(0), x, train=False)
  apply = lambda x, train: layer.apply(params, x, train=train,  # noqa: E731
                                       rngs={"dropout": jax.random.key(1)})
  assert "pvt_attention" in _compiled_text(lambda x: apply(x, False), x)
  assert "pvt_attention" not in _compiled_text(lambda x: apply(x, True), x)


@pytest.mark.parametrize("kernel", ["depthwise", "attention", "layer_norm", "weight_gradient"])
def test_backwards_are_deterministic(kernel):
  rng = np.random.default_rng(1)
  backward, args = {
      "depthwise": (kernels.depthwise_gelu_backward, _arrays(rng, 3, 29, 11, 32)),
      "attention": (kernels.attention_backward, _attention_arrays(rng, 1, 333, 2, 32, 49)),
      "layer_norm": (lambda x, scale, _, g: kernels.layer_norm_backward(x, scale, g, 1e-6),
                     _norm_arrays(rng, 1000, 48)),
      "weight_gradient": (lambda x, g: (kernels.weight_gradient(x, g),),
                          (rng.standard_normal((5000, 32)), rng.standard_normal((5000, 64)))),
  }[kernel]
  first, second = jax.jit(backward)(*args), jax.jit(backward)(*args)
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a, b)


def test_library_is_cached_and_rebuilt_only_when_missing(tmp_path, monkeypatch):
  monkeypatch.setenv("PVT_JAX_CACHE_DIR", str(tmp_path))
  path = kernels.library_path()
  assert path.parent == tmp_path and path.exists()
  built_at = path.stat().st_mtime_ns
  assert kernels.library_path() == path and path.stat().st_mtime_ns == built_at
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_disabled_cpu_forms_trace_the_plain_ones():
  x, taps, bias, _, _ = _arrays(np.random.default_rng(4), 2, 5, 6, 32)
  with cpu.disabled():
    assert not cpu.enabled()
    text = _compiled_text(lambda x: _ffn_hidden(x, taps, bias), x)
    assert "pvt_depthwise_gelu" not in text and "convolution(" in text  # the grouped conv
  assert cpu.enabled() and "pvt_depthwise_gelu" in _compiled_text(
      lambda x: _ffn_hidden(x, taps, bias), x)


def test_without_a_compiler_ops_fall_back_to_xla_with_one_warning(tmp_path, monkeypatch):
  monkeypatch.setenv("PVT_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  kernels.available.cache_clear()
  try:
    with pytest.warns(RuntimeWarning, match="CPU kernels unavailable.*no-such-compiler"):
      assert not kernels.available()
    x, taps, bias, _, _ = _arrays(np.random.default_rng(2), 2, 4, 3, 8)
    text = _compiled_text(lambda x: _ffn_hidden(x, taps, bias), x)
    assert "pvt_depthwise_gelu" not in text
  finally:
    monkeypatch.undo()
    kernels.available.cache_clear()
  assert kernels.available()  # and back once the compiler is


def test_a_failing_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
  cache, sources = tmp_path / "cache", tmp_path / "kernels"
  sources.mkdir()
  (sources / "broken.cc").write_text("this is not C++\n")
  monkeypatch.setenv("PVT_JAX_CACHE_DIR", str(cache))
  monkeypatch.setattr(kernels, "_SOURCES", sources)
  with pytest.raises(RuntimeError, match="failed: .*broken.cc"):
    kernels.library_path()
  assert list(cache.iterdir()) == []


_SHARDED = """
import sys
import jax, jax.numpy as jnp, numpy as np
from pvt_jax.models import dispatch
from pvt_jax.train import sharding
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 6, 5, 32)).astype(np.float32)
weights = [jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)
           for shape in ((32, 32), (32,), (3, 3, 1, 32), (32,))]
loss = lambda *a: (dispatch.conv_ffn_hidden(*a, relu=False) ** 2).sum()
grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
batch = sharding.batch_sharding(sharding.create_mesh(fsdp=int(sys.argv[1])))
sharded = jax.device_put(x, batch)
hlo = grads.lower(sharded, *weights).compile().as_text()
assert "all-gather" not in hlo, hlo
assert "f32[2,6,5,32]{3,2,1,0} custom-call(" in hlo, hlo  # each device runs its half
got = grads(sharded, *weights)
want = grads(jnp.asarray(x), *weights)
assert got[0].sharding.is_equivalent_to(batch, x.ndim), got[0].sharding
for a, b in zip(got, want):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))

q = jnp.asarray(rng.standard_normal((4, 30, 2, 16)), jnp.float32)
kv = jnp.asarray(rng.standard_normal((4, 7, 2, 2, 16)), jnp.float32)
attention_loss = lambda q, kv: (dispatch.attention(q, kv) ** 2).sum()
grads = jax.jit(jax.grad(attention_loss, argnums=(0, 1)))
sharded = [jax.device_put(a, batch) for a in (q, kv)]
hlo = grads.lower(*sharded).compile().as_text()
assert "all-gather" not in hlo, hlo
assert "f32[2,30,2,16]{3,2,1,0} custom-call(" in hlo, hlo
got, want = grads(*sharded), grads(q, kv)
for a, b in zip(got, want):
  assert a.sharding.is_equivalent_to(batch, a.ndim), a.sharding
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))

kernel = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
dense_loss = lambda x, k: (dispatch.dense(x, k, jnp.zeros(48)) ** 2).sum()
grad = jax.jit(jax.grad(dense_loss, argnums=1))
sharded = jax.device_put(x, batch)
hlo = grad.lower(sharded, kernel).compile().as_text()
assert "all-gather" not in hlo, hlo
assert 'custom_call_target="pvt_weight_gradient"' in hlo, hlo
assert "f32[60,32]" in hlo, hlo  # each device sums its 2 x 6 x 5 rows
got, want = grad(sharded, kernel), grad(jnp.asarray(x), kernel)
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

scale, bias = jnp.linspace(0.5, 1.5, 32), jnp.linspace(-1.0, 1.0, 32)
norm_loss = lambda x, s, b: (dispatch.layer_norm(x, s, b, eps=1e-6) ** 3).sum()
grads = jax.jit(jax.grad(norm_loss, argnums=(0, 1, 2)))
sharded = jax.device_put(x, batch)
hlo = grads.lower(sharded, scale, bias).compile().as_text()
assert "all-gather" not in hlo, hlo
assert "f32[60,32]{1,0} custom-call(" in hlo, hlo  # each device normalises its 2 x 6 x 5 rows
got, want = grads(sharded, scale, bias), grads(jnp.asarray(x), scale, bias)
assert got[0].sharding.is_equivalent_to(batch, x.ndim), got[0].sharding
for a, b in zip(got, want):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
print("ok")
"""


@pytest.mark.parametrize("fsdp", [1, 2])
def test_batch_sharded_inputs_run_per_device_and_sum_the_weight_gradients(fsdp):
  """The trainer's mesh: the batch split over ('data', 'fsdp'), 2 x 1 or 1 x 2 devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(_SHARDED), str(fsdp)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_direct_calls_register_the_kernels_first():
  """A fresh process whose first use is the kernels' own functions, not the model's ops."""
  script = ("import jax.numpy as jnp; from pvt_jax.cpu import kernels; "
            "print(float(kernels.attention(jnp.ones((1, 3, 1, 16)), "
            "jnp.ones((1, 2, 2, 1, 16))).sum()))")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and float(result.stdout) == 48.0, result.stderr[-2000:]


_GRADIENT_BITS = textwrap.dedent("""
    import hashlib, os, sys
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:int(sys.argv[1])]))
    import jax, jax.numpy as jnp, numpy as np
    from pvt_jax.models import dispatch
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 256, 1, 32)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 64, 2, 1, 32)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 64, 8, 32)), jnp.float32)
    fc1, fc1_bias = jnp.eye(32), jnp.zeros(32)
    taps, bias = jnp.asarray(rng.standard_normal((3, 3, 1, 32)), jnp.float32), jnp.zeros(32)
    grads = jax.jit(jax.grad(lambda q, kv, x, taps: dispatch.attention(q, kv).sum()
                             + dispatch.conv_ffn_hidden(x, fc1, fc1_bias, taps, bias,
                                                        relu=False).sum(),
                             argnums=(0, 1, 2, 3)))(q, kv, x, taps)
    print(hashlib.sha256(b"".join(np.asarray(g).tobytes() for g in grads)).hexdigest())
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_kernel_gradients_do_not_depend_on_the_thread_count():
  """One image, one head: the kernels' partial sums (attention dk/dv, the depthwise taps) are
  split by a fixed work-item count, so 1 and 2 cores (XLA's pool follows the affinity) agree."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  bits = [subprocess.run([sys.executable, "-c", _GRADIENT_BITS, str(cores)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout for cores in (1, 2)]
  assert bits[0] == bits[1] and len(bits[0].strip()) == 64
