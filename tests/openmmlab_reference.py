"""The real mmseg / mmdet modules as references (no compiled mmcv ops are installed here).

mmcv-lite lacks `mmcv._ext`; FPN, FPNHead and their forward passes never call its ops, so a stub
that raises on use is registered before the first import (REFERENCE.md, "Running the real
mmseg/mmdet modules"). Import torch/timm before TensorFlow in one process.
"""

import sys
import types

import numpy as np
import torch


def _install_ext_stub() -> None:
  if "mmcv._ext" in sys.modules:
    return
  stub = types.ModuleType("mmcv._ext")

  def missing(name):
    if name.startswith("__"):
      raise AttributeError(name)

    def unavailable(*args, **kwargs):
      raise RuntimeError(f"mmcv._ext.{name} is not available (mmcv-lite)")

    return unavailable

  stub.__getattr__ = missing
  sys.modules["mmcv._ext"] = stub


def mmseg_models():
  """mmseg.models with its modules registered."""
  _install_ext_stub()
  import mmseg.models

  return mmseg.models


def mmdet_necks():
  _install_ext_stub()
  import mmdet.models.necks

  return mmdet.models.necks


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter and BN buffer random, so no init hides a bug: conv kernels ~ N(0, 1/fan_in)
  (activations stay O(1) through the layers), biases and BN shifts/means ~ N(0, 0.5^2), BN
  scales ~ N(1, 0.2^2), running variances in [0.5, 1.5]."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name.endswith("num_batches_tracked"):
        tensor.fill_(1234)
        continue
      values = torch.randn(tensor.shape, generator=generator)
      if tensor.ndim == 4:
        values /= float(np.sqrt(np.prod(tensor.shape[1:])))
      elif name.endswith("running_var"):
        values = torch.rand(tensor.shape, generator=generator) + 0.5
      elif name.endswith(".weight"):
        values = 1 + 0.2 * values
      else:
        values *= 0.5
      tensor.copy_(values)
  return module


def nhwc(tensor: torch.Tensor) -> np.ndarray:
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


def nchw(array: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def flax_variables(state_dict: dict, prefix: str = "") -> dict:
  """An mm state dict as {'params', 'batch_stats'} trees, written here independently of pvt_jax's
  converter: `a.b.0.c.weight` -> a / b_0 / c / kernel (HWIO) or scale (1-D), BN running stats
  -> batch_stats mean / var; `num_batches_tracked` is dropped."""
  variables = {"params": {}, "batch_stats": {}}
  for key, tensor in state_dict.items():
    if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
      continue
    parts = []
    for part in key[len(prefix):].split("."):
      if part.isdigit():
        parts[-1] += f"_{part}"
      else:
        parts.append(part)
    value = tensor.detach().numpy().copy()  # torch updates BN buffers in place
    *path, leaf = parts
    collection = "params"
    if leaf == "weight":
      leaf = "kernel" if value.ndim == 4 else "scale"
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    elif leaf in ("running_mean", "running_var"):
      collection, leaf = "batch_stats", leaf[len("running_"):]
    node = variables[collection]
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  return variables
