"""RetinaNet (Lin et al., 2017) on PVT v2, as the official `retinanet_pvt_v2_*_fpn_1x_coco.py`
configs build it in mmdet: the backbone's four stage maps, an FPN over stages 2-4 (start_level
1) with P6 a stride-2 3x3 conv on the stage-4 map ('on_input') and P7 one on P6 with no ReLU
between (the configs leave mmdet's `relu_before_extra_convs` False), 256 channels, and the
RetinaHead shared by the five levels.

Parameter names follow the mmdet checkpoints' prefixes (`backbone`, `neck`, `bbox_head` with
`cls_convs_{i}`, `reg_convs_{i}`, `retina_cls`, `retina_reg`), so they convert by renaming. The
head is initialised as mmdet's RetinaHead (normal std 0.01, zero bias, the classifier's bias
-log((1 - 0.01) / 0.01) so every anchor starts at probability 0.01), the FPN with Xavier uniform.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvt_jax.models import create_model
from pvt_jax.models.fpn import FPN

head_init = nn.initializers.normal(stddev=0.01)
NUM_ANCHORS = 9  # 3 octave scales x 3 aspect ratios per location


def prior_bias(probability: float):
  """Bias init for sigmoid outputs starting at `probability` (mmdet `bias_init_with_prob`)."""
  return nn.initializers.constant(-math.log((1 - probability) / probability))


def _conv3x3(features, name, bias_init=nn.initializers.zeros, dtype=jnp.float32):
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=head_init,
                 bias_init=bias_init, dtype=dtype, name=name)


class TowerConv(nn.Module):
  """One 3x3 conv + ReLU of a head tower: mmcv's `ConvModule` (no norm), hence its conv is a
  child `conv` as in the checkpoints (`cls_convs.{i}.conv.weight`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.relu(_conv3x3(self.features, "conv", dtype=self.dtype)(x))


class RetinaHead(nn.Module):
  """Per level: two towers of `stacked_convs` 3x3 conv + ReLU, then a 3x3 conv to
  num_anchors * num_classes logits and one to num_anchors * 4 box deltas (NHWC, channel
  a * C + c as mmdet's). The same weights serve every level."""
  num_classes: int = 80
  num_anchors: int = NUM_ANCHORS
  feat_channels: int = 256
  stacked_convs: int = 4
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels) -> tuple[list, list]:
    """(per-level logits [B, H, W, A*C], per-level deltas [B, H, W, A*4])."""
    towers = {branch: [TowerConv(self.feat_channels, self.dtype, name=f"{branch}_convs_{i}")
                       for i in range(self.stacked_convs)] for branch in ("cls", "reg")}
    retina_cls = _conv3x3(self.num_anchors * self.num_classes, "retina_cls",
                          prior_bias(self.prior_prob), self.dtype)
    retina_reg = _conv3x3(self.num_anchors * 4, "retina_reg", dtype=self.dtype)
    cls_maps, box_maps = [], []
    for x in levels:
      cls, reg = x, x
      for conv in towers["cls"]:
        cls = conv(cls)
      for conv in towers["reg"]:
        reg = conv(reg)
      cls_maps.append(retina_cls(cls))
      box_maps.append(retina_reg(reg))
    return cls_maps, box_maps


class RetinaNet(nn.Module):
  """PVT v2 backbone + FPN (P3-P7) + RetinaHead; `__call__` gives the head's per-level maps."""
  variant: str
  num_classes: int = 80
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = create_model(self.variant, num_classes=0, drop_path_rate=self.drop_path_rate,
                                 dtype=self.dtype)
    self.neck = FPN(out_channels=256, num_outs=5, start_level=1, add_extra_convs="on_input",
                    dtype=self.dtype)
    self.bbox_head = RetinaHead(self.num_classes, dtype=self.dtype)

  def __call__(self, images, train: bool = False):
    """images [B, H, W, 3] (normalised, zero-padded) -> (cls maps, box maps), five levels each."""
    return self.bbox_head(self.neck(self.backbone.features(images, train)))


def create_retinanet(variant: str, num_classes: int = 80, **kwargs) -> RetinaNet:
  """The detector of the official configs; kwargs: drop_path_rate, dtype."""
  return RetinaNet(variant, num_classes, **kwargs)


def param_shapes(variant: str, num_classes: int = 80) -> dict:
  """The model's parameter shapes (jax.eval_shape: nothing is allocated)."""
  model = RetinaNet(variant, num_classes)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]


def num_params(variant: str, num_classes: int = 80) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(variant, num_classes)))


def forward_gflops(variant: str, height: int = 1280, width: int = 800,
                   num_classes: int = 80) -> float:
  """XLA's FLOP count of the forward on one (height, width) image, / 2 to count
  multiply-adds as the paper's GFLOPs (mmcv's counter) do. The default is the official
  `get_flops.py`'s default `--shape 1280 800`, which it reads as (H, W)."""
  from pvt_jax.benchmark import xla_flops  # the one FLOP counter (handles the CPU kernels)

  model = RetinaNet(variant, num_classes)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  params = param_shapes(variant, num_classes)

  def forward(p, x):
    return model.apply({"params": p}, x)

  return xla_flops(forward, params, images) / 2 / 1e9
