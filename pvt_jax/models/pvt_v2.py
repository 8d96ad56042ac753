"""PVT v2 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", 2021).

Numerically the official `classification/pvt_v2.py`: the same layers, LayerNorm epsilons (1e-5 in
patch embeddings and spatial reduction, 1e-6 in blocks and stage norms), exact erf GELU, PyTorch's
symmetric conv padding and adaptive-pool bins, and the same initialisation. Maps are NHWC
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


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the paper's Table 1 (C_i, L_i, N_i, E_i, R_i), the linear-SRA switch, and the
  official facts of the released model (the one place configs, tests and benchmarks read them)."""
  embed_dims: Sequence[int]
  depths: Sequence[int]
  mlp_ratios: Sequence[int]
  official: Official
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  linear: bool = False


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


class OverlapPatchEmbed(nn.Module):
  """Overlapping patch embedding: conv (kernel k, stride s, padding k // 2) then LayerNorm."""
  embed_dim: int
  patch_size: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv(self.embed_dim, self.patch_size, self.stride, self.patch_size // 2, self.dtype,
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


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (`"dropout"` rng stream)."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(SRA(LN(x))), then x + DropPath(ConvFFN(LN(x)))."""
  dim: int
  num_heads: int
  mlp_ratio: int
  sr_ratio: int
  linear: bool = False
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = LayerNorm(1e-6, self.dtype, name="norm1")(x)
    y = SpatialReductionAttention(self.dim, self.num_heads, self.sr_ratio, self.linear,
                                  self.attn_drop_rate, self.drop_rate, self.dtype, name="attn")(
                                      y, train)
    x = x + DropPath(self.drop_path_rate)(y, train)
    y = LayerNorm(1e-6, self.dtype, name="norm2")(x)
    y = ConvFFN(self.dim * self.mlp_ratio, self.linear, self.drop_rate, self.dtype, name="mlp")(
        y, train)
    return x + DropPath(self.drop_path_rate)(y, train)


class Stage(nn.Module):
  """One pyramid stage: patch embedding (stride 4 for the first, 2 after), blocks, LayerNorm."""
  index: int
  variant: Variant
  drop_path_rates: Sequence[float]
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, train: bool):
    v, i = self.variant, self.index
    block = remat.block_class(Block, self.remat_policy)
    patch, stride = (7, 4) if i == 0 else (3, 2)
    x = OverlapPatchEmbed(v.embed_dims[i], patch, stride, self.dtype, name="patch_embed")(x)
    for j, rate in enumerate(self.drop_path_rates):
      x = block(v.embed_dims[i], v.num_heads[i], v.mlp_ratios[i], v.sr_ratios[i], v.linear,
                self.drop_rate, self.attn_drop_rate, rate, self.dtype, name=f"block{j}")(x, train)
    return LayerNorm(1e-6, self.dtype, name="norm")(x)


class PyramidVisionTransformerV2(nn.Module):
  """PVT v2 classifier; `features` gives the four stage maps (strides 4, 8, 16, 32)."""
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
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=linear_init, name="head")
    self.head_drop = nn.Dropout(self.drop_rate)

  def features(self, x, train: bool = False):
    """The four NHWC maps after each stage norm (fp32 inputs are cast to the compute dtype)."""
    maps = []
    x = x.astype(self.dtype)
    for stage in self.stages:
      x = stage(x, train)
      maps.append(x)
    return maps

  def __call__(self, x, train: bool = False):
    """Logits in fp32, or the pooled stage-4 features when `num_classes == 0`."""
    pooled = self.features(x, train)[-1].astype(jnp.float32).mean(axis=(1, 2))
    if not self.num_classes:
      return pooled
    return self.head(self.head_drop(pooled, deterministic=not train))
