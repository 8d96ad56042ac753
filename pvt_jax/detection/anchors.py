"""RetinaNet's anchors: mmdet's `AnchorGenerator` (octave scales, ratio-major base anchors centred
on the grid points, center offset 0) and its padding-aware valid flags.

Anchors of a level are ordered as the head's outputs are flattened: row-major over the feature
map, then the base anchors of a location (ratio-major: for each ratio h/w in `ratios`, each octave
scale). Everything is float32 arithmetic in mmdet's order, so the anchors are bit-identical.
"""

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
  """Base anchor size = stride; scales octave_base_scale * 2**(i / scales_per_octave)."""
  strides: Sequence[int] = (8, 16, 32, 64, 128)
  ratios: Sequence[float] = (0.5, 1.0, 2.0)
  octave_base_scale: float = 4.0
  scales_per_octave: int = 3

  @property
  def num_anchors(self) -> int:
    """Anchors per feature-map location."""
    return len(self.ratios) * self.scales_per_octave

  def base_anchors(self, stride: int) -> np.ndarray:
    """[num_anchors, 4] float32 around (0, 0)."""
    scales = np.array([2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)])
    scales = (scales * self.octave_base_scale).astype(np.float32)
    h_ratios = np.sqrt(np.asarray(self.ratios, np.float32))
    w_ratios = np.float32(1) / h_ratios
    ws = (np.float32(stride) * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (np.float32(stride) * h_ratios[:, None] * scales[None, :]).reshape(-1)
    half = np.float32(0.5)
    return np.stack([-half * ws, -half * hs, half * ws, half * hs], -1)

  def level_anchors(self, level: int, feature_size: tuple[int, int]):
    """[h * w * num_anchors, 4] anchors of one level with an (h, w) feature map."""
    stride = self.strides[level]
    h, w = feature_size
    xs = jnp.arange(w, dtype=jnp.float32) * stride
    ys = jnp.arange(h, dtype=jnp.float32) * stride
    shifts = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]) * 2, -1)  # x, y, x, y
    anchors = shifts.reshape(-1, 1, 4) + jnp.asarray(self.base_anchors(stride))[None]
    return anchors.reshape(-1, 4)

  def anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> list:
    """Per level, the anchors of its (h, w) feature map (static shapes)."""
    self._check_levels(feature_sizes)
    return [self.level_anchors(i, size) for i, size in enumerate(feature_sizes)]

  def valid_flags(self, feature_sizes: Sequence[tuple[int, int]], pad_size) -> list:
    """Per level, bool [h * w * num_anchors]: the anchor's location lies in the first
    ceil(pad / stride) rows and columns, `pad_size` = (h, w) being the image padded to the size
    divisor (mmdet's `pad_shape`; may be traced). The rest of a fixed canvas is no image."""
    self._check_levels(feature_sizes)
    pad_size = jnp.asarray(pad_size, jnp.int32)
    flags = []
    for stride, (h, w) in zip(self.strides, feature_sizes, strict=True):
      rows = jnp.arange(h) < (pad_size[0] + stride - 1) // stride
      cols = jnp.arange(w) < (pad_size[1] + stride - 1) // stride
      valid = rows[:, None] & cols[None, :]
      flags.append(jnp.repeat(valid.reshape(-1), self.num_anchors))
    return flags

  def _check_levels(self, feature_sizes):
    if len(feature_sizes) != len(self.strides):
      raise ValueError(f"{len(feature_sizes)} feature maps for {len(self.strides)} anchor "
                       f"strides {tuple(self.strides)}")
