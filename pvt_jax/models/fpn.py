"""Feature Pyramid Network (Lin et al., 2017) with mmseg/mmdet `FPN` semantics, NHWC.

One module serves Semantic FPN (4 outputs from all levels) and RetinaNet (start_level=1, an
extra stride-2 conv 'on_input' and one on the output after it: 5 outputs). Levels are merged top
down by nearest upsampling to the lower level's size, exactly PyTorch's
`F.interpolate(size=..., mode='nearest')` (also for odd sizes, where 2x would not fit), and the
resizes are index gathers with indices computed at trace time, so shapes stay static.

Parameter names follow mmseg/mmdet's `lateral_convs.{i}` and `fpn_convs.{i}` (as
`lateral_convs_{i}`, `fpn_convs_{i}`; extra convs continue the `fpn_convs` numbering), so
checkpoints convert by renaming. Convs are initialised as mmseg/mmdet's FPN does (its `init_cfg`:
Xavier uniform, gain 1, zero bias), which is also what the PVT v2 paper says for new layers.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

EXTRA_CONV_SOURCES = ("on_input", "on_lateral", "on_output")


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's legacy 'nearest' source index: min(floor(dst * (in / out)), in - 1), in float32."""
  if out_size == in_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, in_size - 1)


def resize_nearest(x, size: Sequence[int]):
  """[B, H, W, C] -> [B, size[0], size[1], C] as `F.interpolate(x, size, mode='nearest')`."""
  rows = _nearest_indices(x.shape[1], size[0])
  cols = _nearest_indices(x.shape[2], size[1])
  if x.shape[1] != size[0]:
    x = jnp.take(x, rows, axis=1)
  if x.shape[2] != size[1]:
    x = jnp.take(x, cols, axis=2)
  return x


def _linear_weights(in_size: int, out_size: int, align_corners: bool):
  """(first index, second index, weight of the second) per output pixel, as PyTorch's CPU and
  CUDA kernels compute them: a float32 scale, the source coordinate scale * (dst + 0.5) - 0.5 as
  one fused multiply-add rounded once to float32 (emulated in float64, where the product is
  exact), clamped at 0 when align_corners=False."""
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = np.float32(in_size - 1) / np.float32(max(out_size - 1, 1))
    src = (np.float64(scale) * dst).astype(np.float32)
  else:
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0))
  first = src.astype(np.int64)  # truncation == floor for src >= 0
  second = np.where(first < in_size - 1, first + 1, first)
  weight = np.clip(src - first.astype(np.float32), 0, 1).astype(np.float32)
  return first, second, weight


def _lerp_axis(x, axis: int, out_size: int, align_corners: bool):
  in_size = x.shape[axis]
  if in_size == out_size:  # PyTorch's source coordinates are then exactly the output's
    return x
  first, second, weight = _linear_weights(in_size, out_size, align_corners)
  shape = [1] * x.ndim
  shape[axis] = out_size
  weight = jnp.asarray(weight.reshape(shape), x.dtype)
  a, b = jnp.take(x, first, axis=axis), jnp.take(x, second, axis=axis)
  return a * (1 - weight) + b * weight


def resize_bilinear(x, size: Sequence[int], align_corners: bool = False):
  """[B, H, W, C] -> [B, size[0], size[1], C] as `F.interpolate(x, size, mode='bilinear')`.

  Unlike `jax.image.resize`, no antialiasing when shrinking: PyTorch interpolates between the two
  nearest source pixels at any scale, and mmseg's logits resizes rely on that.
  """
  x = _lerp_axis(x, 1, size[0], align_corners)
  return _lerp_axis(x, 2, size[1], align_corners)


xavier_uniform = nn.initializers.xavier_uniform()


class ConvLayer(nn.Module):
  """A k x k conv with PyTorch's symmetric padding k // 2 (mmcv `ConvModule` without norm or
  activation, as the FPN uses it), Xavier-uniform kernel and zero bias."""
  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.kernel_size // 2
    return nn.Conv(self.features, (self.kernel_size,) * 2, strides=self.stride,
                   padding=((pad, pad), (pad, pad)), kernel_init=xavier_uniform,
                   dtype=self.dtype, name="conv")(x)


class FPN(nn.Module):
  """mmseg/mmdet `FPN` over a list of NHWC maps (highest resolution first); returns a tuple.

  Attributes mirror mmseg's arguments: `end_level` is exclusive as in mmseg (-1: up to the last
  input; mmdet's inclusive `end_level=e` is `end_level=e + 1` here). `add_extra_convs` is False
  (extra outputs are stride-2 subsamplings, `max_pool2d(1, stride=2)`) or where the first extra
  stride-2 3x3 conv reads from: 'on_input' (the last used backbone map), 'on_lateral' or
  'on_output'. A bare True is refused: mmdet reads it as 'on_input', mmseg as 'on_output'.
  """
  out_channels: int = 256
  num_outs: int = 4
  start_level: int = 0
  end_level: int = -1
  add_extra_convs: bool | str = False
  relu_before_extra_convs: bool = False
  dtype: Any = jnp.float32

  def _levels(self, num_inputs: int) -> int:
    """The exclusive end of the backbone levels used, after checking the arguments."""
    if self.add_extra_convs is True or (self.add_extra_convs is not False
                                        and self.add_extra_convs not in EXTRA_CONV_SOURCES):
      raise ValueError(f"add_extra_convs={self.add_extra_convs!r}: use False or one of "
                       f"{', '.join(map(repr, EXTRA_CONV_SOURCES))} (True means 'on_input' in "
                       f"mmdet and 'on_output' in mmseg)")
    if not 0 <= self.start_level < num_inputs:
      raise ValueError(f"start_level={self.start_level} with {num_inputs} input maps")
    if self.end_level == -1:
      end = num_inputs
      if self.num_outs < end - self.start_level:
        raise ValueError(f"num_outs={self.num_outs} < the {end - self.start_level} levels "
                         f"from start_level={self.start_level}")
    else:
      end = self.end_level
      if not self.start_level < end <= num_inputs or self.num_outs != end - self.start_level:
        raise ValueError(f"end_level={end} (exclusive) needs start_level < end_level <= "
                         f"{num_inputs} and num_outs == end_level - start_level")
    return end

  @nn.compact
  def __call__(self, inputs: Sequence[Any]) -> tuple:
    end = self._levels(len(inputs))
    used = range(self.start_level, end)
    laterals = [ConvLayer(self.out_channels, 1, dtype=self.dtype, name=f"lateral_convs_{i}")(
        inputs[level]) for i, level in enumerate(used)]
    for i in range(len(laterals) - 1, 0, -1):  # top down; each sum feeds the next level
      laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
    outs = [ConvLayer(self.out_channels, 3, dtype=self.dtype, name=f"fpn_convs_{i}")(lateral)
            for i, lateral in enumerate(laterals)]
    extra = self.num_outs - len(outs)
    if extra > 0 and not self.add_extra_convs:
      for _ in range(extra):
        outs.append(outs[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2): ceil(H / 2) rows
    elif extra > 0:
      source = {"on_input": inputs[end - 1], "on_lateral": laterals[-1],
                "on_output": outs[-1]}[self.add_extra_convs]
      for k in range(extra):
        if k > 0:
          source = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
        outs.append(ConvLayer(self.out_channels, 3, stride=2, dtype=self.dtype,
                              name=f"fpn_convs_{len(laterals) + k}")(source))
    return tuple(outs)
