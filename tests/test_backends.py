"""The seam between backends: a train step lowered for GPU or TPU is plain XLA (no custom calls),
while the same step on this CPU runs the C++ kernels."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from pvt_jax.models import VARIANTS, create_model
from pvt_jax.models.pvt_v2 import PyramidVisionTransformerV2, Variant

# B2-Li's linear attention and ReLU FFN in a network small enough to trace in a moment.
TINY_LINEAR = Variant((16, 32, 80, 128), (1, 1, 1, 1), (4, 4, 4, 4), VARIANTS["b2_li"].official,
                      linear=True)
# PVT v1's switches (patch embedding, position embeddings and class token, plain MLP) likewise.
TINY_V1 = Variant((16, 32, 80, 128), (1, 1, 1, 1), (4, 4, 4, 4), VARIANTS["v1_tiny"].official,
                  overlapping_patches=False, conv_ffn=False, position_embedding=True)
FFI_TARGETS = {"pvt_attention", "pvt_attention_backward", "pvt_depthwise_gelu",
               "pvt_depthwise_gelu_backward", "pvt_layer_norm", "pvt_layer_norm_backward",
               "pvt_weight_gradient"}


def _train_step(model):
  """(step, abstract arguments): AdamW on cross-entropy with dropout and stochastic depth on."""
  tx = optax.adamw(1e-3, weight_decay=0.05)
  images = jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]

  def step(params, opt_state, images, labels, key):
    def loss(p):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  args = (params, jax.eval_shape(tx.init, params), images,
          jax.ShapeDtypeStruct((2,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))
  return jax.jit(step), args


MODELS = {
    "b0": lambda: create_model("b0", 10, drop_path_rate=0.1, drop_rate=0.1),
    "tiny_linear": lambda: PyramidVisionTransformerV2(TINY_LINEAR, 10, drop_path_rate=0.1),
    "tiny_v1": lambda: PyramidVisionTransformerV2(TINY_V1, 10, drop_path_rate=0.1, drop_rate=0.1),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_train_step_exported_for_gpu_and_tpu_has_no_custom_calls(name):
  step, args = _train_step(MODELS[name]())
  exported = jax.export.export(step, platforms=["cuda", "tpu"])(*args)
  assert exported.platforms == ("cuda", "tpu")
  text = exported.mlir_module()
  assert "stablehlo.convolution" in text  # the plain forms: XLA's own convolutions
  assert "stablehlo.custom_call" not in text, sorted(set(re.findall(r"custom_call @(\w+)", text)))


def test_the_same_train_step_on_this_cpu_runs_every_kernel():
  step, args = _train_step(MODELS["b0"]())
  text = step.lower(*args).as_text()
  assert set(re.findall(r"custom_call @(pvt_\w+)", text)) == FFI_TARGETS
