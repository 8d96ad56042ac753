"""Semantic FPN (Kirillov et al., 2019) on PVT v2: the model of the paper's Table 5.

The official `segmentation/configs/sem_fpn/PVTv2/fpn_pvtv2_*_ade20k_40k.py` (whai362/PVTv2-Seg,
mmseg 0.13 `EncoderDecoder`): the PVT v2 backbone's four stage maps -> mmseg `FPN` (256 channels,
4 outputs) -> mmseg `FPNHead` (128 channels, SyncBN, dropout 0.1, align_corners False) -> logits
at stride 4, resized bilinearly to the input. NHWC throughout.

BatchNorm has PyTorch's semantics (eps 1e-5, momentum 0.1, running variance updated with the
unbiased batch variance). Under `jax.jit` the batch statistics of a globally sharded batch are
reduced over the whole data-parallel batch, which is what SyncBN does, with no axis names.

Initialisation follows the code the paper's numbers come from: FPN convs Xavier uniform (mmseg
FPN), head convs Kaiming normal fan_out (mmcv `ConvModule`), BN weight 1 / bias 0, the classifier
`conv_seg` N(0, 0.01^2) with zero bias (mmseg `BaseDecodeHead`).
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pvt_jax.models import VARIANTS, create_model
from pvt_jax.models.fpn import FPN, resize_bilinear

# Paper Table 5 (ADE20K, Semantic FPN): parameters (M), GFLOPs at 512x512 (mmcv's counter:
# multiply-adds), mIoU (%).
PAPER_TABLE5 = {
    "b0": (7.6, 25.0, 37.2), "b1": (17.8, 34.2, 42.5), "b2_li": (26.3, 41.0, 45.1),
    "b2": (29.1, 45.8, 45.2), "b3": (49.0, 62.4, 47.3), "b4": (66.3, 81.3, 47.9),
    "b5": (85.7, 91.1, 48.7),
}
FEATURE_STRIDES = (4, 8, 16, 32)

kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_init = nn.initializers.normal(stddev=0.01)


class BatchNorm(nn.Module):
  """PyTorch `BatchNorm2d` over NHWC maps: batch statistics in training (biased variance for
  normalising, unbiased for the running average), running statistics in evaluation.

  Statistics are computed in float32 in two passes whatever the compute dtype. Running averages
  are updated only when 'batch_stats' is mutable (`apply(..., mutable=['batch_stats'])`).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      x32 = x.astype(jnp.float32)
      mean = x32.mean(axis=(0, 1, 2))
      var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        n = x.shape[0] * x.shape[1] * x.shape[2]
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * multiplier
    return (x * multiplier.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)


class ConvBNReLU(nn.Module):
  """mmcv `ConvModule(k=3, padding=1, norm_cfg=SyncBN)`: conv without bias, BN, ReLU."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=kaiming_fan_out, dtype=self.dtype, name="conv")(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))


class FPNHead(nn.Module):
  """mmseg `FPNHead`: per level max(1, log2(stride / 4)) conv-BN-ReLU blocks, each followed by
  2x bilinear upsampling except at the finest stride; the levels summed (each resized to the
  finest level's size first); channel dropout (`Dropout2d`); 1x1 classifier.

  Blocks are named `scale_heads_{level}_{index}` with mmseg's `nn.Sequential` index (upsampling
  layers take the odd indices), so `decode_head.scale_heads.2.2.conv.weight` converts by renaming.
  """
  num_classes: int
  channels: int = 128
  feature_strides: Sequence[int] = FEATURE_STRIDES
  dropout_rate: float = 0.1
  align_corners: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool = False):
    finest = self.feature_strides[0]
    output = None
    for level, (x, stride) in enumerate(zip(features, self.feature_strides, strict=True)):
      upsample = stride != finest
      for k in range(max(1, int(math.log2(stride) - math.log2(finest)))):
        x = ConvBNReLU(self.channels, self.dtype,
                       name=f"scale_heads_{level}_{2 * k if upsample else k}")(x, train)
        if upsample:  # mmseg `Upsample(scale_factor=2)`: to int(2 * size), as F.interpolate(size)
          x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), self.align_corners)
      output = x if output is None else output + resize_bilinear(x, output.shape[1:3],
                                                                 self.align_corners)
    output = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(output,
                                                                  deterministic=not train)
    return nn.Conv(self.num_classes, (1, 1), kernel_init=classifier_init, dtype=self.dtype,
                   name="conv_seg")(output)


class SemanticFPN(nn.Module):
  """PVT v2 + FPN + FPNHead. `__call__` gives float32 logits at the input's size (what mmseg's
  `encode_decode` returns); `decode` gives them at stride 4 (ceil of input / 4).

  Parameters: {'backbone': the classification model's tree without its head, 'neck':
  `lateral_convs_i`/`fpn_convs_i`, 'decode_head': `scale_heads_i_j`/`conv_seg`}; BN running
  statistics in 'batch_stats' under 'decode_head'.
  """
  variant: str
  num_classes: int = 150
  neck_channels: int = 256
  head_channels: int = 128
  dropout_rate: float = 0.1
  drop_path_rate: float = 0.0
  align_corners: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = create_model(self.variant, num_classes=0,
                                 drop_path_rate=self.drop_path_rate, dtype=self.dtype)
    self.neck = FPN(self.neck_channels, num_outs=4, dtype=self.dtype)
    self.decode_head = FPNHead(self.num_classes, self.head_channels,
                               dropout_rate=self.dropout_rate, align_corners=self.align_corners,
                               dtype=self.dtype)

  def decode(self, images, train: bool = False):
    """float32 logits [B, ceil(H / 4), ceil(W / 4), num_classes] of NHWC images."""
    features = self.backbone.features(images, train)
    return self.decode_head(self.neck(features), train).astype(jnp.float32)

  def __call__(self, images, train: bool = False):
    """float32 logits [B, H, W, num_classes]: `decode`'s, resized bilinearly to the input."""
    return resize_bilinear(self.decode(images, train), images.shape[1:3], self.align_corners)


def create_semantic_fpn(variant: str, num_classes: int = 150, **kwargs) -> SemanticFPN:
  """A Semantic FPN by backbone variant name (b0 ... b5, b2_li)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown PVT v2 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  return SemanticFPN(variant, num_classes, **kwargs)


def init_shapes(model: SemanticFPN, image_size: Sequence[int] = (64, 64)) -> dict:
  """The variables' shapes ({'params', 'batch_stats'}), without computing anything."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_size, 3)))


def num_params(model: SemanticFPN) -> int:
  """Trainable parameters (BN running statistics excluded, as PyTorch counts them)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(init_shapes(model)["params"]))


def xla_gflops(model: SemanticFPN, image_size: Sequence[int] = (512, 512),
               batch_size: int = 1) -> float:
  """XLA's FLOP count (cost analysis of the eval forward pass, logits at the input's
  size) per image, in GFLOPs. XLA counts a multiply-add as two FLOPs; the paper's Table 5 (mmcv's
  counter) counts it as one."""
  from pvt_jax.benchmark import xla_flops  # the one FLOP counter (handles the CPU kernels)

  variables = init_shapes(model)
  images = jax.ShapeDtypeStruct((batch_size, *image_size, 3), jnp.float32)

  def forward(variables, images):
    return model.apply(variables, images)

  return xla_flops(forward, variables, images) / batch_size / 1e9


def cross_entropy_loss(logits, labels, ignore_index: int = 255, avg_non_ignore: bool = False):
  """mmseg's `CrossEntropyLoss` on logits at the labels' size ([B, H, W, K], [B, H, W]): pixels
  labelled `ignore_index` contribute 0; the mean is over every pixel (mmseg's default,
  avg_non_ignore=False) or over the scored ones only."""
  import optax  # the models stay importable without the training stack

  valid = labels != ignore_index
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  losses = jnp.where(valid, losses, 0.0)
  count = valid.sum() if avg_non_ignore else valid.size
  return losses.sum() / jnp.maximum(count, 1)


def _lerp_per_example(x, axis: int, in_sizes, out_sizes, out_length: int, align_corners: bool):
  """Bilinear resize of each example along `axis` from its first in_sizes[b] entries to
  out_sizes[b] entries (an axis of static length out_length; entries beyond out_sizes[b] are
  filler), with PyTorch's source coordinates (float32, clamped at 0; last index clamped)."""
  dst = jnp.arange(out_length, dtype=jnp.float32)[None]
  size_in = in_sizes.astype(jnp.float32)[:, None]
  size_out = out_sizes.astype(jnp.float32)[:, None]
  if align_corners:
    src = (size_in - 1) / jnp.maximum(size_out - 1, 1) * dst
  else:
    src = jnp.maximum(size_in / size_out * (dst + 0.5) - 0.5, 0.0)
  last = in_sizes[:, None].astype(jnp.int32) - 1
  first = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  second = jnp.minimum(first + 1, last)
  weight = jnp.clip(src - first.astype(jnp.float32), 0.0, 1.0)
  shape = [x.shape[0]] + [1] * (x.ndim - 1)
  shape[axis] = out_length

  def gather(index):
    return jnp.take_along_axis(x, index.reshape(shape), axis=axis, mode="clip")

  weight = weight.reshape(shape).astype(x.dtype)
  return gather(first) * (1 - weight) + gather(second) * weight


def predict_labels(logits, image_sizes, label_shape, label_sizes, align_corners: bool = False):
  """Whole-image predictions at each label's original size, as mmseg 0.13 computes them:
  stride-4 logits resized bilinearly to the network input's size, then to the label's size, then
  argmax. Per example, from static canvases, so one program serves a whole eval bucket.

  logits: [B, Hc / 4, Wc / 4, K] (`SemanticFPN.decode` of the canvas); image_sizes: int [B, 2]
  each image's size in the canvas (multiples of 4, top-left); label_shape: the label canvas
  (Lh, Lw); label_sizes: int [B, 2]. Returns int32 [B, Lh, Lw] (filler beyond label_sizes).
  """
  canvas = (4 * logits.shape[1], 4 * logits.shape[2])
  height, width = image_sizes[:, 0], image_sizes[:, 1]
  x = logits.astype(jnp.float32)
  # `encode_decode`: to the network input's size; then `inference`: to the label's.
  x = _lerp_per_example(x, 1, height // 4, height, canvas[0], align_corners)
  x = _lerp_per_example(x, 2, width // 4, width, canvas[1], align_corners)
  x = _lerp_per_example(x, 1, height, label_sizes[:, 0], label_shape[0], align_corners)
  x = _lerp_per_example(x, 2, width, label_sizes[:, 1], label_shape[1], align_corners)
  return jnp.argmax(x, axis=-1).astype(jnp.int32)
