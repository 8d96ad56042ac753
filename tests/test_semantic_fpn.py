"""Semantic FPN on PVT v2 against timm's PVT v2 + the real mmseg FPN and FPNHead; parameter counts
of the paper's Table 5; PyTorch BatchNorm semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from openmmlab_reference import flax_variables, mmseg_models, nchw, nhwc, randomize_
from torch_reference import random_timm_model, state_dict_in

from pvt_jax.checkpoints import layouts
from pvt_jax.models import VARIANTS
from pvt_jax.models.semantic_fpn import (
    PAPER_TABLE5,
    BatchNorm,
    FPNHead,
    create_semantic_fpn,
    init_shapes,
    num_params,
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


@pytest.mark.parametrize("variant", list(VARIANTS))
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
