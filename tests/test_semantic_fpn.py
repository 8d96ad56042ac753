"""Semantic FPN on PVT v2 against timm's PVT v2 + the real mmseg FPN and FPNHead; parameter counts
of the paper's Table 5; PyTorch BatchNorm semantics."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from openmmlab_reference import flax_variables, mmseg_models, nchw, nhwc, randomize_
from torch_reference import random_timm_model, state_dict_in

from pvt_jax.checkpoints import layouts
from pvt_jax.models import V2_VARIANTS, VARIANTS
from pvt_jax.models.semantic_fpn import (
    PAPER_TABLE5,
    BatchNorm,
    FPNHead,
    create_semantic_fpn,
    cross_entropy_loss,
    init_shapes,
    num_params,
    predict_labels,
)

TOLERANCE = 1e-4
NUM_CLASSES = 150


def mmseg_head(num_classes, seed, dropout_ratio=0.1):
  """mmseg's FPNHead of the official config with random weights and BN statistics (BN: the
  config's SyncBN as plain BN, identical outside distributed training)."""
  return randomize_(mmseg_models().decode_heads.FPNHead(
      in_channels=[256] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
      channels=128, dropout_ratio=dropout_ratio, num_classes=num_classes,
      norm_cfg=dict(type="BN", requires_grad=True), align_corners=False), seed).eval()


def mmseg_reference(variant, num_classes, seed):
  """timm's backbone, mmseg's FPN and FPNHead, all with random weights."""
  backbone = random_timm_model(variant, num_classes=0, seed=seed)
  widths = list(VARIANTS[variant].embed_dims)
  neck = randomize_(mmseg_models().necks.FPN(widths, 256, 4), seed + 1)
  return backbone.eval(), neck.eval(), mmseg_head(num_classes, seed + 2)


def reference_logits(reference, images_nhwc):
  """mmseg EncoderDecoder.encode_decode: backbone -> neck -> head -> bilinear to the input."""
  backbone, neck, head = reference
  x = nchw(images_nhwc)
  with torch.no_grad():
    _, maps = backbone.forward_intermediates(x)
    logits = head(neck(maps))
    return nhwc(F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False))


def our_variables(reference, variant):
  """Our variables from the reference's weights: backbone through the official key names (the
  classification converter, tested against timm elsewhere), neck and head renamed here."""
  backbone, neck, head = reference
  official = state_dict_in("official", backbone, variant)
  neck_vars = flax_variables(neck.state_dict())
  head_vars = flax_variables(head.state_dict())
  params = {"backbone": layouts.official_to_params(official), "neck": neck_vars["params"],
            "decode_head": head_vars["params"]}
  return {"params": params, "batch_stats": {"decode_head": head_vars["batch_stats"]}}


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("variant,shape", [("b0", (1, 512, 512)), ("b0", (2, 200, 296)),
                                           ("b2_li", (1, 200, 296))])
def test_logits_equal_mmseg(variant, shape):
  reference = mmseg_reference(variant, NUM_CLASSES, seed=len(variant) + shape[1])
  images = np.random.default_rng(0).standard_normal((*shape, 3), np.float32)
  expected = reference_logits(reference, images)
  model = create_semantic_fpn(variant, NUM_CLASSES)
  variables = our_variables(reference, variant)
  assert jax.tree.structure(variables) == jax.tree.structure(init_shapes(model))
  logits = jax.jit(model.apply)(variables, images)
  assert logits.shape == expected.shape == (*shape, NUM_CLASSES)
  assert np.abs(expected).mean() > 0.3  # random weights and statistics: non-tiny logits
  assert np.max(np.abs(np.asarray(logits) - expected)) <= TOLERANCE


@pytest.mark.torch
def test_training_mode_batch_norm_equals_torch():
  """Training forward (dropout off) and BN running statistics after two steps equal mmseg's
  FPNHead in train mode: biased variance normalises, the unbiased one enters the average."""
  head = mmseg_head(5, seed=7, dropout_ratio=0.0)
  maps = [np.random.default_rng(i).standard_normal((2, s, s + 3, 256), np.float32) * 2 + 1
          for i, s in enumerate((16, 8, 4, 2))]
  ours = FPNHead(5, dropout_rate=0.0)
  variables = flax_variables(head.state_dict())
  head.train()
  for _ in range(2):
    with torch.no_grad():
      expected = nhwc(head([nchw(m) for m in maps]))
    logits, state = ours.apply(variables, maps, train=True, mutable=["batch_stats"])
    variables = {**variables, **state}
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOLERANCE, rtol=0)
  updated = flax_variables(head.state_dict())["batch_stats"]
  for ours_leaf, theirs in zip(jax.tree.leaves(variables["batch_stats"]),
                               jax.tree.leaves(updated), strict=True):
    np.testing.assert_allclose(np.asarray(ours_leaf), theirs, atol=1e-5, rtol=1e-5)


def test_batch_norm_without_mutable_stats_leaves_them():
  x = jnp.arange(24.0).reshape(2, 2, 2, 3)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  y = bn.apply(variables, x, train=True)  # batch statistics, nothing to update
  np.testing.assert_allclose(np.asarray(y.mean(axis=(0, 1, 2))), 0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y.var(axis=(0, 1, 2))), 1, atol=1e-4)
  _, state = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(state["batch_stats"]["mean"]),
                             0.1 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-6)


# REFERENCE.md: B2 widths with mmseg's FPN + FPNHead (150 classes) + B2's headless backbone.
MMSEG_B2_PARAMS = 29_116_502


@pytest.mark.parametrize("variant", V2_VARIANTS)
def test_parameter_counts_match_table5(variant):
  count = num_params(create_semantic_fpn(variant, NUM_CLASSES))
  assert abs(count / 1e6 - PAPER_TABLE5[variant][0]) <= 0.1
  if variant == "b2":
    assert count == MMSEG_B2_PARAMS


def test_variables_layout_and_init():
  model = create_semantic_fpn("b0", 7)
  shapes = init_shapes(model, (32, 32))
  assert sorted(shapes) == ["batch_stats", "params"]
  assert sorted(shapes["params"]) == ["backbone", "decode_head", "neck"]
  # Levels at strides 4, 8, 16, 32: 1, 1, 2, 3 blocks; mmseg's Sequential indices skip upsamples.
  assert sorted(shapes["params"]["decode_head"]) == [
      "conv_seg", "scale_heads_0_0", "scale_heads_1_0", "scale_heads_2_0", "scale_heads_2_2",
      "scale_heads_3_0", "scale_heads_3_2", "scale_heads_3_4"]
  assert sorted(shapes["batch_stats"]["decode_head"]["scale_heads_3_4"]["bn"]) == ["mean", "var"]
  logits = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 61, 93, 3)))
  assert logits.shape == (2, 61, 93, 7) and logits.dtype == jnp.float32
  decoded = jax.eval_shape(functools.partial(model.apply, method="decode"), shapes,
                           jnp.zeros((2, 61, 93, 3)))
  assert decoded.shape == (2, 16, 24, 7)

  maps = [jnp.zeros((1, s, s, 256)) for s in (8, 4, 2, 1)]
  head = FPNHead(7).init(jax.random.key(0), maps)["params"]
  np.testing.assert_allclose(np.asarray(head["conv_seg"]["kernel"]).std(), 0.01, rtol=0.1)
  conv = np.asarray(head["scale_heads_1_0"]["conv"]["kernel"])  # Kaiming normal, fan_out
  np.testing.assert_allclose(conv.std(), np.sqrt(2 / (9 * 128)), rtol=0.05)
  assert "bias" not in head["scale_heads_1_0"]["conv"]
  assert not np.asarray(head["conv_seg"]["bias"]).any()


def test_dropout_drops_whole_channels():
  """mmseg's head dropout is Dropout2d: a channel is dropped over the whole map (the rest scaled
  by 1 / (1 - p)); compared with the same head without dropout."""
  maps = [jax.random.normal(jax.random.key(i), (1, s, s, 256)) for i, s in enumerate((8, 4, 2, 1))]

  def dropout_output(rate):
    model = FPNHead(3, dropout_rate=rate)
    variables = model.init(jax.random.key(0), maps)
    capture = model.apply(variables, maps, train=True, rngs={"dropout": jax.random.key(1)},
                          mutable=["batch_stats", "intermediates"],
                          capture_intermediates=lambda m, _: type(m).__name__ == "Dropout")[1]
    return np.asarray(jax.tree.leaves(capture["intermediates"])[0])[0].reshape(-1, 128)

  kept, dropped = dropout_output(0.0), dropout_output(0.5)
  assert (np.abs(kept) > 0).mean() > 0.3
  zero = (dropped == 0).all(axis=0)
  assert 20 < zero.sum() < 108
  np.testing.assert_allclose(dropped[:, ~zero], 2 * kept[:, ~zero], rtol=1e-6, atol=1e-6)


def test_predictions_at_label_size_equal_mmseg_two_resizes():
  """mmseg 0.13 whole inference: stride-4 logits -> input size -> original size -> argmax,
  per example from shared canvases (the last example fills its canvas)."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 24, 32, 5)).astype(np.float32)
  image_sizes = np.array([[64, 96], [32, 64], [96, 128]])
  label_sizes = np.array([[71, 101], [40, 90], [130, 200]])
  predictions = np.asarray(jax.jit(predict_labels, static_argnums=2)(
      logits, image_sizes, (130, 200), label_sizes))
  assert predictions.shape == (3, 130, 200)
  for b, ((h, w), (lh, lw)) in enumerate(zip(image_sizes, label_sizes, strict=True)):
    x = torch.from_numpy(logits[b:b + 1, :h // 4, :w // 4].transpose(0, 3, 1, 2).copy())
    x = F.interpolate(x, size=(int(h), int(w)), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(int(lh), int(lw)), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(predictions[b, :lh, :lw], x.argmax(1)[0].numpy())


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_equals_torch_with_ignore_index(avg_non_ignore):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 9, 11, 6)).astype(np.float32)
  labels = rng.integers(0, 6, (2, 9, 11))
  labels[rng.random(labels.shape) < 0.3] = 255
  ours = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels),
                            avg_non_ignore=avg_non_ignore)
  losses = F.cross_entropy(nchw(logits), torch.from_numpy(labels), ignore_index=255,
                           reduction="none")
  # mmseg's default averages over every pixel; avg_non_ignore=True over the scored ones.
  expected = losses.sum() / ((labels != 255).sum() if avg_non_ignore else labels.size)
  np.testing.assert_allclose(float(ours), float(expected), rtol=1e-5)


def test_neck_head_loss_and_eval_are_plain_xla_for_gpu_and_tpu():
  """The dense parts are plain XLA on accelerators: a training gradient (BN statistics updated)
  and the eval path (predictions at label size, confusion matrix) lower for CUDA and TPU with no
  custom calls."""
  from pvt_jax.metrics.segmentation import confusion_matrix
  from pvt_jax.models.fpn import FPN

  maps = [jax.ShapeDtypeStruct((2, s, s + 1, c), jnp.float32)
          for s, c in zip((16, 8, 4, 2), (32, 64, 160, 256), strict=True)]
  neck, head = FPN(32, 4), FPNHead(5, channels=16)

  def forward(variables, maps, train):
    outs = neck.apply({"params": variables["params"]["neck"]}, maps)
    head_vars = {"params": variables["params"]["head"], "batch_stats": variables["batch_stats"]}
    return head.apply(head_vars, outs, train, rngs={"dropout": jax.random.key(0)},
                      mutable=["batch_stats"] if train else False)

  def init(maps):
    neck_params = neck.init(jax.random.key(0), maps)["params"]
    head_vars = head.init(jax.random.key(0), neck.apply({"params": neck_params}, maps))
    return {"params": {"neck": neck_params, "head": head_vars["params"]},
            "batch_stats": head_vars["batch_stats"]}

  variables = jax.eval_shape(init, maps)

  def train_step(variables, maps, labels):
    def loss(params):
      logits, state = forward({**variables, "params": params}, maps, True)
      logits = jax.image.resize(logits, (2, 64, 68, 5), "nearest")
      return cross_entropy_loss(logits, labels), state
    return jax.grad(loss, has_aux=True)(variables["params"])

  def eval_step(variables, maps, labels, sizes):
    logits = forward(variables, maps, False)
    predictions = predict_labels(logits, sizes, (70, 80), sizes)
    return confusion_matrix(labels, predictions, 5)

  labels = jax.ShapeDtypeStruct((2, 64, 68), jnp.int32)
  for fn, args in ((train_step, (variables, maps, labels)),
                   (eval_step, (variables, maps, jax.ShapeDtypeStruct((2, 70, 80), jnp.int32),
                                jax.ShapeDtypeStruct((2, 2), jnp.int32)))):
    exported = jax.export.export(jax.jit(fn), platforms=("cuda", "tpu"))(*args)
    assert "stablehlo.custom_call" not in exported.mlir_module()


def test_sem_fpn_config_modes_hold_the_paper_recipe():
  from configs import sem_fpn

  c = sem_fpn.get_config("b2,ade20k")
  assert (c.task, c.variant, c.dataset.split(":")[0], c.batch_size, c.num_train_steps) == (
      "segmentation", "b2", "ade20k", 16, 40_000)
  assert (c.optimizer.base_lr * c.batch_size / c.optimizer.lr_batch_base,
          c.optimizer.weight_decay, c.optimizer.schedule, c.optimizer.poly_power,
          c.optimizer.min_lr) == (1e-4, 1e-4, "poly", 0.9, 0.0)
  assert (tuple(c.seg.crop_size), tuple(c.seg.scale), tuple(c.seg.ratio_range),
          c.seg.cat_max_ratio, tuple(c.seg.eval_scale), c.seg.size_divisor) == (
              (512, 512), (2048, 512), (0.5, 2.0), 0.75, (2048, 512), 32)
  quick, smoke = sem_fpn.get_config(), sem_fpn.get_config("b1,runlocal")
  assert (quick.variant, quick.dataset, smoke.variant) == ("b0", "fashion_mnist_seg", "b1")
  assert smoke.num_train_steps < 10
  with pytest.raises(ValueError, match="unknown config mode 'coco'"):
    sem_fpn.get_config("b0,coco")


def test_batch_norm_statistics_cover_the_global_batch_on_two_devices():
  """SyncBN for free: BN over a batch sharded on 2 devices gives the unsharded outputs and
  running statistics (XLA reduces over the devices)."""
  code = textwrap.dedent("""
      import numpy as np, jax
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from pvt_jax.models.semantic_fpn import BatchNorm
      mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
      x = np.random.default_rng(0).standard_normal((4, 5, 6, 3)).astype(np.float32)
      x[:2] += 3.0  # the two shards' statistics differ
      bn = BatchNorm()
      variables = bn.init(jax.random.key(0), x, train=False)
      step = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
      sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
      (y2, s2), (y1, s1) = step(variables, sharded), step(variables, x)
      assert len(sharded.sharding.device_set) == 2
      np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=1e-5)
      for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
      print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
