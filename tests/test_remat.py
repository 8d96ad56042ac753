"""Rematerialised blocks: the same parameters and gradients, less memory kept for the backward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pvt_jax.models import create_model, remat

IMAGES = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
LABELS = jax.nn.one_hot(jnp.array([1, 3]), 10)


def _loss_and_grad(policy):
  """B0's training loss (drop path on, so the `dropout` rng and `train` pass through remat)."""
  model = create_model("b0", num_classes=10, drop_path_rate=0.1, remat_policy=policy)
  params = model.init(jax.random.key(0), IMAGES[:1])["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy(logits, LABELS).mean()

  return params, loss_fn


@pytest.fixture(scope="module")
def without_remat():
  params, loss_fn = _loss_and_grad("none")
  loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return params, loss_and_grads, remat.residual_bytes(loss_fn, params)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_same_parameters_and_gradients_fewer_residuals(without_remat, policy):
  params_plain, (loss_plain, grads_plain), residuals_plain = without_remat
  params, loss_fn = _loss_and_grad(policy)
  assert jax.tree.structure(params) == jax.tree.structure(params_plain)  # checkpoints load
  jax.tree.map(np.testing.assert_array_equal, params, params_plain)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  np.testing.assert_allclose(loss, loss_plain, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, grads_plain)
  assert remat.residual_bytes(loss_fn, params) < 0.3 * residuals_plain


def test_unknown_policy_is_one_line_error():
  with pytest.raises(ValueError, match="unknown remat policy 'dots'; choose one of none, full"):
    create_model("b0", remat_policy="dots")
