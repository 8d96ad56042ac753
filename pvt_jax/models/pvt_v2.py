"""PVT v2 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", 2021), and
PVT v1 as the same network with the paper's three improvements switched off (its Table 6).

Numerically the official `classification/pvt_v2.py`: the same layers, LayerNorm epsilons (1e-5 in
patch embeddings and spatial reduction, 1e-6 in blocks and stage norms), exact erf GELU, PyTorch's
symmetric conv padding and adaptive-pool bins, and the same initialisation. With the v1 switches
(`Variant.overlapping_patches`, `conv_ffn`, `position_embedding` off/on) it is numerically the
official `classification/pvt.py` (and the backbone of `detection/pvt.py`). Maps are NHWC
throughout; any input of at least 32x32 pixels works, square or not.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pvt_jax.models import dispatch, ops, remat


@dataclasses.dataclass(frozen=True)
class Official:
  """What the official release says of a variant: parameters with the 1000-class head, GMACs at
  224x224 (the paper's "GFLOPs" column counts multiply-adds), ImageNet-1k top-1 of the released
  weights, and its training recipe's drop-path rate and gradient-norm clipping (0: none)."""
  params: int
  gmacs: float
  top1: float
  drop_path_rate: float
  grad_clip_norm: float = 0.0


# PVT v1 learns its position embeddings for 224x224 images: 56x56, 28x28, 14x14 and 7x7 tokens.
POSITION_EMBEDDING_SIZE = 224


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the paper's Table 1 (C_i, L_i, N_i, E_i, R_i), the switches between PVT v1 and
  v2 (Table 6), and the official facts of the released model (the one place configs, tests and
  benchmarks read them).

  linear: linear SRA (B2-Li: 7x7 average pooling for keys/values, ReLU in the conv FFN), else SRA.
  overlapping_patches: v2's overlapping patch embedding (OPE: 7x7/4, then 3x3/2 convs), else v1's
    non-overlapping one (kernel = stride).
  conv_ffn: v2's conv FFN (CFFN: a 3x3 depthwise conv after fc1), else v1's plain MLP.
  position_embedding: v1's tokens: a learned absolute position embedding per stage (bilinearly
    resized for other input sizes), one LayerNorm after stage 4 instead of one per stage, and
    for classification a class token in stage 4 when its blocks are token-wise (`class_token`).
  """
  embed_dims: Sequence[int]
  depths: Sequence[int]
  mlp_ratios: Sequence[int]
  official: Official
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  linear: bool = False
  overlapping_patches: bool = True
  conv_ffn: bool = True
  position_embedding: bool = False

  @property
  def class_token(self) -> bool:
    """v1 classifies a class token that joins stage 4's tokens; it needs that stage token-wise
    (plain MLP, full attention), else the head mean-pools the stage-4 map as v2 does."""
    return (self.position_embedding and not self.conv_ffn and not self.linear
            and self.sr_ratios[3] == 1)


_WIDE = (64, 128, 320, 512)
VARIANTS = {
    "b0": Variant((32, 64, 160, 256), (2, 2, 2, 2), (8, 8, 4, 4),
                  Official(3_666_760, 0.57, 70.5, 0.1)),
    "b1": Variant(_WIDE, (2, 2, 2, 2), (8, 8, 4, 4), Official(14_009_000, 2.12, 78.7, 0.1)),
    "b2": Variant(_WIDE, (3, 4, 6, 3), (8, 8, 4, 4), Official(25_362_856, 4.05, 82.0, 0.1)),
    "b2_li": Variant(_WIDE, (3, 4, 6, 3), (8, 8, 4, 4), Official(22_553_512, 3.91, 82.1, 0.1),
                     linear=True),
    "b3": Variant(_WIDE, (3, 4, 18, 3), (8, 8, 4, 4), Official(45_238_696, 6.92, 83.1, 0.3, 1.0)),
    "b4": Variant(_WIDE, (3, 8, 27, 3), (8, 8, 4, 4), Official(62_556_072, 10.14, 83.6, 0.3, 1.0)),
    "b5": Variant(_WIDE, (3, 6, 40, 3), (4, 4, 4, 4), Official(81_956_008, 11.76, 83.8, 0.3, 1.0)),
}
V2_VARIANTS = tuple(VARIANTS)  # timm's pvt_v2_* and the official pvt_v2_b*.pth releases


def _v1(depths, official) -> Variant:
  return Variant(_WIDE, depths, (8, 8, 4, 4), official, overlapping_patches=False,
                 conv_ffn=False, position_embedding=True)


# PVT v1 (Wang et al., ICCV 2021; official `classification/pvt.py` and configs/pvt/*.py), and the
# ablation's "+ OPE" row: v1-Small with overlapping patch embedding and v2's tokens (no position
# embeddings; the v2 paper's Table 6 #2). Its parameters are B2's less the 3x3 depthwise convs.
V1_VARIANTS = {
    "v1_tiny": _v1((2, 2, 2, 2), Official(13_229_288, 1.9, 75.1, 0.1)),
    "v1_small": _v1((3, 4, 6, 3), Official(24_485_864, 3.8, 79.8, 0.1)),
    "v1_medium": _v1((3, 4, 18, 3), Official(44_208_104, 6.7, 81.2, 0.3, 1.0)),
    "v1_large": _v1((3, 8, 27, 3), Official(61_369_320, 9.8, 81.7, 0.3, 1.0)),
}
ABLATION_VARIANTS = {
    "v1_small_ope": Variant(_WIDE, (3, 4, 6, 3), (8, 8, 4, 4),
                            Official(25_168_296, float("nan"), 81.1, 0.1), conv_ffn=False),
}
VARIANTS.update(V1_VARIANTS)
VARIANTS.update(ABLATION_VARIANTS)


# Official init: Linear ~ N(0, .02) truncated at +-2 (absolute, i.e. +-100 std), conv
# ~ N(0, 2 / fan_out) with fan_out = kh * kw * out_channels // groups, all biases 0.
linear_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nn.initializers.normal(stddev=float(np.sqrt(2.0 / 9.0)))  # fan_out = 3*3*C // C

Dtype = Any


class Conv(nn.Module):
  """Conv2d parameters in Flax layout [kh, kw, in, out], applied with PyTorch's padding."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return dispatch.conv2d(x.astype(self.dtype), kernel, bias, stride=self.stride,
                           padding=self.padding)


class Dense(nn.Module):
  """`nn.Dense`'s parameters, with the official initialisation."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def weights(self, fan_in: int):
    """(kernel [fan_in, features], bias [features]), created on first use."""
    kernel = self.param("kernel", linear_init, (fan_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return kernel, bias

  def __call__(self, x):
    return dispatch.dense(x.astype(self.dtype), *self.weights(x.shape[-1]))


class DepthwiseConv3x3(nn.Module):
  """The FFN's 3x3 depthwise conv (`mlp.dwconv.dwconv` officially); the FFN applies it."""

  @nn.compact
  def weights(self, channels: int):
    """(kernel [3, 3, 1, channels], bias [channels]), created on first use."""
    kernel = self.param("kernel", depthwise_init, (3, 3, 1, channels))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    return kernel, bias


class LayerNorm(nn.Module):
  """LayerNorm over channels with PyTorch's statistics; `nn.LayerNorm`'s params."""
  epsilon: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return dispatch.layer_norm(x.astype(self.dtype), scale, bias, eps=self.epsilon)


class PatchEmbed(nn.Module):
  """Patch embedding: conv (kernel k, stride s, padding p) then LayerNorm; overlapping (v2: k > s,
  p = k // 2) or not (v1: k = s, p = 0)."""
  embed_dim: int
  patch_size: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv(self.embed_dim, self.patch_size, self.stride, self.padding, self.dtype,
             name="proj")(x)
    return LayerNorm(1e-5, self.dtype, name="norm")(x)


class SpatialReductionAttention(nn.Module):
  """Multi-head attention whose keys/values come from a spatially reduced map.

  sr_ratio > 1: an sr x sr stride-sr conv + LayerNorm reduces the map; sr_ratio == 1: keys and
  values come from the full map; linear (B2-Li): adaptive average pooling to 7x7, 1x1 conv,
  LayerNorm and GELU, so the cost grows linearly with the number of pixels.
  """
  dim: int
  num_heads: int
  sr_ratio: int
  linear: bool = False
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    q = Dense(c, self.dtype, name="q")(x).reshape(b, h * w, self.num_heads, head_dim)
    if self.linear:
      kv_map = ops.adaptive_avg_pool(x.astype(self.dtype), 7)
      kv_map = Conv(c, 1, dtype=self.dtype, name="sr")(kv_map)
      kv_map = ops.gelu(LayerNorm(1e-5, self.dtype, name="norm")(kv_map))
    elif self.sr_ratio > 1:
      kv_map = Conv(c, self.sr_ratio, self.sr_ratio, dtype=self.dtype, name="sr")(x)
      kv_map = LayerNorm(1e-5, self.dtype, name="norm")(kv_map)
    else:
      kv_map = x
    kv = Dense(2 * c, self.dtype, name="kv")(kv_map).reshape(b, -1, 2, self.num_heads, head_dim)
    if train and self.attn_drop_rate > 0:  # dropout between the softmax and the product
      attn = ops.attention_probabilities(q, kv[:, :, 0])
      attn = nn.Dropout(self.attn_drop_rate)(attn, deterministic=False)
      out = jnp.einsum("bhqk,bkhd->bqhd", attn, kv[:, :, 1])
    else:
      out = dispatch.attention(q, kv)
    out = out.reshape(b, h, w, c)
    out = Dense(c, self.dtype, name="proj")(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=not train)


class ConvFFN(nn.Module):
  """Convolutional feed-forward network: fc1 -> [ReLU if linear] -> dwconv 3x3 -> GELU -> fc2."""
  hidden_dim: int
  linear: bool = False
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    fc1 = Dense(self.hidden_dim, self.dtype, name="fc1").weights(dim)
    dwconv = DepthwiseConv3x3(name="dwconv").weights(self.hidden_dim)
    x = dispatch.conv_ffn_hidden(x.astype(self.dtype), *fc1, *dwconv, relu=self.linear)
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    x = Dense(dim, self.dtype, name="fc2")(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class MLP(nn.Module):
  """PVT v1's feed-forward network: fc1 -> GELU -> fc2, token by token (no depthwise conv)."""
  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    x = ops.gelu(Dense(self.hidden_dim, self.dtype, name="fc1")(x))
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    x = Dense(dim, self.dtype, name="fc2")(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (`"dropout"` rng stream)."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(SRA(LN(x))), then x + DropPath(FFN(LN(x))), the FFN
  a ConvFFN or (v1) an MLP."""
  dim: int
  num_heads: int
  mlp_ratio: int
  sr_ratio: int
  linear: bool = False
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  conv_ffn: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    y = LayerNorm(1e-6, self.dtype, name="norm1")(x)
    y = SpatialReductionAttention(self.dim, self.num_heads, self.sr_ratio, self.linear,
                                  self.attn_drop_rate, self.drop_rate, self.dtype, name="attn")(
                                      y, train)
    x = x + DropPath(self.drop_path_rate)(y, train)
    y = LayerNorm(1e-6, self.dtype, name="norm2")(x)
    hidden = self.dim * self.mlp_ratio
    ffn = (ConvFFN(hidden, self.linear, self.drop_rate, self.dtype, name="mlp") if self.conv_ffn
           else MLP(hidden, self.drop_rate, self.dtype, name="mlp"))
    y = ffn(y, train)
    return x + DropPath(self.drop_path_rate)(y, train)


class Stage(nn.Module):
  """One pyramid stage: patch embedding (stride 4 for the first, 2 after), [v1: + position
  embedding], blocks, [v2: LayerNorm].

  With `class_token` (v1 classification, stage 4) the class token joins the tokens: the stage
  then returns them as a [B, 1, 1 + H*W, C] row, the class token first.
  """
  index: int
  variant: Variant
  drop_path_rates: Sequence[float]
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, train: bool, class_token: bool = False):
    v, i = self.variant, self.index
    block = remat.block_class(Block, self.remat_policy)
    stride = 4 if i == 0 else 2
    if v.overlapping_patches:  # OPE: 7x7/4, then 3x3/2, zero-padded by k // 2
      patch = 7 if i == 0 else 3
      padding = patch // 2
    else:  # v1: kernel = stride, no padding
      patch, padding = stride, 0
    x = PatchEmbed(v.embed_dims[i], patch, stride, padding, self.dtype, name="patch_embed")(x)
    if v.position_embedding:
      x = self._add_position_embedding(x, train, class_token)
    for j, rate in enumerate(self.drop_path_rates):
      x = block(v.embed_dims[i], v.num_heads[i], v.mlp_ratios[i], v.sr_ratios[i], v.linear,
                self.drop_rate, self.attn_drop_rate, rate, self.dtype, v.conv_ffn,
                name=f"block{j}")(x, train)
    if v.position_embedding:  # v1: no stage norms; the classifier normalises stage 4's tokens
      return x
    return LayerNorm(1e-6, self.dtype, name="norm")(x)

  def _add_position_embedding(self, x, train: bool, class_token: bool):
    """x + the stage's learned table, resized bilinearly (as the official code) from its 224 px
    grid to the map's size; stage 4's table has a first row for the class token, used iff
    `class_token` (the official detection backbone skips it)."""
    b, h, w, c = x.shape
    grid = POSITION_EMBEDDING_SIZE // (4 * 2**self.index)
    extra = int(self.index == 3 and self.variant.class_token)
    table = self.param("pos_embed", linear_init, (1, extra + grid * grid, c))
    positions = table[0, extra:].reshape(grid, grid, c)
    if (h, w) != (grid, grid):
      positions = ops.bilinear_resize(positions, (h, w))
    x = x + positions.astype(x.dtype)
    if class_token:
      token = self.param("cls_token", linear_init, (1, 1, c)) + table[:, :1]
      x = jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (b, 1, c)),
                           x.reshape(b, h * w, c)], axis=1)[:, None]
    return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class PyramidVisionTransformerV2(nn.Module):
  """PVT v2 (or v1) classifier; `features` gives the four stage maps (strides 4, 8, 16, 32)."""
  variant: Variant
  num_classes: int = 1000
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"  # which activations each block keeps for the backward pass (remat)

  def setup(self):
    v = self.variant
    rates = np.linspace(0.0, self.drop_path_rate, sum(v.depths)).tolist()
    bounds = np.cumsum((0,) + tuple(v.depths)).tolist()
    self.stages = [
        Stage(i, v, rates[bounds[i]:bounds[i + 1]], self.drop_rate, self.attn_drop_rate,
              self.dtype, self.remat_policy, name=f"stage{i + 1}") for i in range(4)
    ]
    if v.position_embedding:
      self.norm = LayerNorm(1e-6, self.dtype, name="norm")  # v1's one norm, of stage 4's tokens
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=linear_init, name="head")
    self.head_drop = nn.Dropout(self.drop_rate)

  def features(self, x, train: bool = False):
    """The four NHWC maps after each stage (v2: after its norm; v1: un-normalised, without the
    class token, as the official detection backbone); fp32 inputs are cast to the compute dtype."""
    maps = []
    x = x.astype(self.dtype)
    for stage in self.stages:
      x = stage(x, train)
      maps.append(x)
    return maps

  def _pooled(self, x, train: bool):
    """What the head reads: v2 the mean of the stage-4 map; v1 its class token (or the mean of
    its tokens) after the final norm."""
    if not self.variant.position_embedding:
      return self.features(x, train)[-1].astype(jnp.float32).mean(axis=(1, 2))
    x = x.astype(self.dtype)
    for stage in self.stages[:-1]:
      x = stage(x, train)
    tokens = self.norm(self.stages[-1](x, train, class_token=self.variant.class_token))
    tokens = tokens.astype(jnp.float32)
    return tokens[:, 0, 0] if self.variant.class_token else tokens.mean(axis=(1, 2))

  def __call__(self, x, train: bool = False):
    """Logits in fp32, or the pooled features when `num_classes == 0`."""
    pooled = self._pooled(x, train)
    if not self.num_classes:
      return pooled
    return self.head(self.head_drop(pooled, deterministic=not train))
