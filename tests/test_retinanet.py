"""The RetinaNet model: parameter counts (paper Table 3), GFLOPs (Table 6), shapes, init, and a
jitted loss gradient and prediction through the whole network."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from pvt_jax import detection
from pvt_jax.models import VARIANTS, retinanet

# Paper Table 3 (RetinaNet 1x, 80 classes), millions of parameters.
TABLE3_PARAMS = {"b0": 13.0, "b1": 23.8, "b2_li": 32.3, "b2": 35.1, "b3": 55.0, "b4": 72.3,
                 "b5": 91.7}
# Paper Table 6 GFLOPs at 1280 x 800.
TABLE6_GFLOPS = {"b2": 290.7, "b2_li": 227.4}


@pytest.mark.parametrize("variant", sorted(TABLE3_PARAMS))
def test_parameter_counts_match_table3(variant):
  count = retinanet.num_params(variant)
  assert abs(count / 1e6 - TABLE3_PARAMS[variant]) <= 0.1
  backbone = VARIANTS[variant].official.params - (VARIANTS[variant].embed_dims[-1] + 1) * 1000
  if VARIANTS[variant].embed_dims == VARIANTS["b2"].embed_dims:
    assert count - backbone == 10_249_972  # FPN + RetinaHead, measured with mmdet 3.3


def test_shapes_and_initialisation():
  model = retinanet.RetinaNet("b0", num_classes=7)
  images = jnp.zeros((1, 100, 150, 3))  # not a multiple of 32
  variables = jax.jit(model.init)(jax.random.key(0), images)
  cls_maps, box_maps = jax.eval_shape(model.apply, variables, images)
  sizes = [(13, 19), (7, 10), (4, 5), (2, 3), (1, 2)]  # ceil(/8), then ceil(/2) per level
  assert [m.shape for m in cls_maps] == [(1, h, w, 9 * 7) for h, w in sizes]
  assert [m.shape for m in box_maps] == [(1, h, w, 36) for h, w in sizes]
  head = variables["params"]["bbox_head"]
  # Every anchor starts at probability 0.01: sigmoid(bias) = 0.01.
  np.testing.assert_allclose(jax.nn.sigmoid(head["retina_cls"]["bias"]), 0.01, rtol=1e-5)
  flat = traverse_util.flatten_dict(head)
  for path, value in flat.items():
    if path[-1] == "kernel":
      assert abs(float(np.std(value)) - 0.01) < 0.002, path
    elif path[-2] != "retina_cls":
      assert not np.any(value), path
  lateral = variables["params"]["neck"]["lateral_convs_0"]["conv"]["kernel"]
  bound = math.sqrt(6 / (lateral.shape[2] + lateral.shape[3]))  # Xavier uniform, 1x1 conv
  assert np.abs(lateral).max() <= bound and np.abs(lateral).max() > 0.9 * bound


@pytest.mark.slow
def test_loss_gradient_and_prediction_through_the_network():
  """One jitted loss/gradient and one jitted prediction of B0 on a batch of two 96x128 canvases,
  the second image smaller than the canvas."""
  model = retinanet.RetinaNet("b0", num_classes=5)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 96, 128, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images[:1])["params"]
  batch = {"image": images, "image_size": np.array([[96, 128], [70, 90]], np.int32),
           "boxes": np.array([[[10, 10, 60, 50], [70, 20, 120, 90]],
                              [[5, 5, 40, 60], [0, 0, 0, 0]]], np.float32),
           "labels": np.array([[1, 4], [2, 0]], np.int32),
           "box_mask": np.array([[True, True], [True, False]])}

  @jax.jit
  def loss_and_grad(p, b):
    def loss_fn(p):
      cls, box = model.apply({"params": p}, b["image"])
      return detection.loss(cls, box, b)
    return jax.value_and_grad(loss_fn, has_aux=True)(p)

  (loss, metrics), grads = loss_and_grad(params, batch)
  assert np.isfinite(loss) and metrics["num_pos"] >= 3
  norms = {k: float(optax.global_norm(v)) for k, v in grads.items()}
  assert all(n > 0 for n in norms.values()), norms

  @jax.jit
  def predict(p, b):
    cls, box = model.apply({"params": p}, b["image"])
    return detection.predict(cls, box, b["image_size"])

  out = predict(params, batch)
  assert out["boxes"].shape == (2, 100, 4) and out["valid"].dtype == bool
  boxes = np.asarray(out["boxes"])
  assert (boxes[1, :, 2] <= 90).all() and (boxes[1, :, 3] <= 70).all()  # clipped to the image


@pytest.mark.parametrize("variant", sorted(TABLE6_GFLOPS))
def test_gflops_next_to_table6(variant):
  """XLA's count of the compiled forward at 1280 x 800, multiply-adds, within 1.5% of Table 6
  (mmcv's counter counts some elementwise ops differently)."""
  gflops = retinanet.forward_gflops(variant)
  assert abs(gflops / TABLE6_GFLOPS[variant] - 1) < 0.015, gflops


def test_gradient_and_prediction_lower_for_tpu_and_gpu_as_plain_xla():
  """Plain XLA on accelerators: the loss gradient and the prediction (top-k, NMS) lower for
  TPU and CUDA with no custom calls."""
  model = retinanet.RetinaNet("b0", 80)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 96, 3)))["params"]
  spec = jax.ShapeDtypeStruct
  batch = {"image": spec((2, 64, 96, 3), jnp.float32), "image_size": spec((2, 2), jnp.int32),
           "boxes": spec((2, 5, 4), jnp.float32), "labels": spec((2, 5), jnp.int32),
           "box_mask": spec((2, 5), jnp.bool_)}

  def gradient(p, b):
    def loss_fn(p):
      return detection.loss(*model.apply({"params": p}, b["image"]), b)[0]
    return jax.grad(loss_fn)(p)

  def predict(p, b):
    return detection.predict(*model.apply({"params": p}, b["image"]), b["image_size"])

  for fn in (gradient, predict):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu", "cuda"])(params, batch)
    assert "stablehlo.custom_call" not in exported.mlir_module()
