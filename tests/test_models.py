"""Model structure, initialisation and modes (numerical parity with timm is in test_parity.py)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pvt_jax import inference_compiler_options
from pvt_jax.models import VARIANTS, create_model


def jit_apply(model):
  """Compiled apply: op-by-op eager Flax is ~10x slower than compiling these small graphs."""
  return jax.jit(model.apply, static_argnames=("train", "method"))


def jit_init(model, x):
  return jax.jit(model.init)(jax.random.key(0), x)


def param_shapes(variant, num_classes=1000, size=64):
  model = create_model(variant, num_classes=num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_counts_equal_official(variant):
  v = VARIANTS[variant]
  with_head, without_head = v.official.params, v.official.params - (v.embed_dims[-1] + 1) * 1000
  def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert count(param_shapes(variant)) == with_head
  assert count(param_shapes(variant, num_classes=0)) == without_head


def random_variables(model, seed=0):
  """Random weights without compiling `init` (XLA:CPU spends ~15 s compiling its RNG calls)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def b0():
  model = create_model("b0", num_classes=10)
  return model, random_variables(model)


@pytest.mark.parametrize("height,width", [(224, 224), (200, 296), (32, 32), (33, 47)])
def test_feature_maps_have_pytorch_strides(b0, height, width):
  model, variables = b0
  maps = jit_apply(model)(variables, jnp.zeros((2, height, width, 3)), method="features")
  h, w = math.ceil(height / 4), math.ceil(width / 4)  # k7 s4 p3, then k3 s2 p1 per stage
  for i, (feature_map, dim) in enumerate(zip(maps, VARIANTS["b0"].embed_dims, strict=False)):
    if i:
      h, w = math.ceil(h / 2), math.ceil(w / 2)
    chex.assert_shape(feature_map, (2, h, w, dim))
    chex.assert_tree_all_finite(feature_map)


def test_headless_model_returns_mean_of_last_map(b0):
  model, variables = b0
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  headless = create_model("b0", num_classes=0)
  backbone = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  pooled = jit_apply(headless)(backbone, x)
  last_map = jit_apply(model)(variables, x, method="features")[-1]
  np.testing.assert_allclose(pooled, last_map.mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
  chex.assert_shape(pooled, (2, 256))


def _leaves_by_kind(params):
  flat = traverse_util.flatten_dict(params)
  kinds = {"linear": [], "conv": [], "dwconv": [], "bias": [], "scale": []}
  for path, value in flat.items():
    name = path[-1]
    if name == "bias":
      kinds["bias"].append(value)
    elif name == "scale":
      kinds["scale"].append(value)
    elif path[-2] == "dwconv":
      kinds["dwconv"].append(value)
    elif value.ndim == 4:
      kinds["conv"].append(value)
    else:
      kinds["linear"].append(value)
  return kinds


def test_initialisation_follows_official_scheme():
  model = create_model("b1")
  params = jit_init(model, jnp.zeros((1, 32, 32, 3)))["params"]
  kinds = _leaves_by_kind(params)
  linear = np.concatenate([np.ravel(k) for k in kinds["linear"]])
  assert abs(linear.mean()) < 1e-4
  assert linear.std() == pytest.approx(0.02, rel=0.01)
  # Truncation at +-2 absolute is ~never reached: the tails are those of a plain normal.
  assert np.mean(np.abs(linear) > 0.04) == pytest.approx(0.0455, rel=0.05)
  for kernel in kinds["conv"]:
    kh, kw, _, out = kernel.shape
    expected = math.sqrt(2.0 / (kh * kw * out))
    if kernel.size > 20_000:  # enough samples for a 5% bound on the std
      assert np.std(kernel) == pytest.approx(expected, rel=0.05)
  dw = np.concatenate([np.ravel(k) for k in kinds["dwconv"]])
  assert np.std(dw) == pytest.approx(math.sqrt(2.0 / 9.0), rel=0.02)  # fan_out = 9 per group
  assert all(np.all(b == 0) for b in kinds["bias"])
  assert all(np.all(s == 1) for s in kinds["scale"])


def test_bfloat16_compute_keeps_fp32_params_and_logits(b0):
  fp32, variables = b0
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  bf16 = create_model("b0", num_classes=10, dtype=jnp.bfloat16)
  chex.assert_trees_all_equal_dtypes(jax.eval_shape(bf16.init, jax.random.key(0), x), variables)
  logits16 = jit_apply(bf16)(variables, x)
  logits32 = jit_apply(fp32)(variables, x)
  assert logits16.dtype == jnp.float32
  assert logits32.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; over 8 blocks the logits stay close, not equal.
  assert not np.array_equal(logits16, logits32)
  scale = np.abs(logits32).max()
  assert np.abs(logits16 - logits32).max() < 0.1 * scale
  maps = jit_apply(bf16)(variables, x, method="features")
  assert all(m.dtype == jnp.bfloat16 for m in maps)


def test_cpu_inference_options_replace_ynnpack_subgraphs_with_the_same_numbers(b0):
  model, variables = b0
  x = jax.random.normal(jax.random.key(3), (2, 40, 56, 3))
  default = jax.jit(model.apply).lower(variables, x).compile()
  tuned = jax.jit(model.apply, compiler_options=inference_compiler_options("cpu")).lower(
      variables, x).compile()
  # If a JAX release stops using YNNPACK subgraphs, the first check says the options are stale.
  assert "__ynn_fusion" in default.as_text()
  assert "__ynn_fusion" not in tuned.as_text()
  np.testing.assert_allclose(tuned(variables, x), default(variables, x), rtol=1e-5, atol=1e-5)
  assert inference_compiler_options("gpu") == inference_compiler_options("tpu") == {}


def test_train_mode_draws_stochastic_depth_from_dropout_stream(b0):
  _, variables = b0
  model = create_model("b0", num_classes=10, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  apply = jit_apply(model)
  eval_a = apply(variables, x)
  def train(key):
    return apply(variables, x, train=True, rngs={"dropout": jax.random.key(key)})
  np.testing.assert_array_equal(train(7), train(7))
  assert not np.allclose(train(7), train(8))
  assert not np.allclose(train(7), eval_a)
  with pytest.raises(Exception, match="dropout"):
    apply(variables, x, train=True)


def test_zero_drop_rates_make_train_mode_deterministic(b0):
  model, variables = b0
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  apply = jit_apply(model)
  train = apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(train, apply(variables, x), rtol=1e-6, atol=1e-6)


def test_stochastic_depth_rates_grow_linearly_over_all_blocks():
  model = create_model("b2", num_classes=0, drop_path_rate=0.3)
  bound = model.bind({"params": {}})  # setup() only builds the submodules
  rates = [r for stage in bound.stages for r in stage.drop_path_rates]
  assert len(rates) == 16
  assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
  np.testing.assert_allclose(np.diff(rates), 0.3 / 15, rtol=1e-6)


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="unknown PVT variant 'b9'.*b2_li"):
    create_model("b9")
