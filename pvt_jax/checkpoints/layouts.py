"""Parameter names and array layouts: our Flax tree and the official, timm and HF state dicts.

Everything goes through the official key names (`patch_embed1.proj.weight`, `block2.0.attn.kv.bias`,
...): timm and HF transformers are renamings of them (HF also splits `attn.kv` into separate key and
value rows), so only the official -> other renames are written here; the reverse lookups come from
renaming every key any variant can have. PVT v1 (`pvt_tiny.pth` ... `pvt_large.pth`) exists only
in the official layout: its extra keys (`pos_embed1`..`pos_embed4`, `cls_token`, one final `norm`)
have no timm or HF names.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.models import VARIANTS, create_model

FORMATS = ("official", "timm", "hf")

_BLOCK_PARTS = ("norm1", "attn.q", "attn.kv", "attn.proj", "attn.sr", "attn.norm", "norm2",
                "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2")
_HF_BLOCK_PARTS = {
    "norm1": "layer_norm_1", "attn.q": "attention.query", "attn.proj": "attention.proj",
    "attn.sr": "attention.spatial_reduction", "attn.norm": "attention.layer_norm",
    "norm2": "layer_norm_2", "mlp.fc1": "mlp.dense1", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.dense2",
}


def _official_to_timm(key: str) -> tuple[str, ...]:
  key = key.replace("mlp.dwconv.dwconv", "mlp.dwconv")
  key = re.sub(r"^patch_embed1\.", "patch_embed.", key)
  key = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", key)
  key = re.sub(r"^block(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", key)
  key = re.sub(r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm.", key)
  return (key,)


def _official_to_hf(key: str) -> tuple[str, ...]:
  if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(\w+)", key):
    part = "proj" if m[2] == "proj" else "layer_norm"
    return (f"pvt_v2.encoder.layers.{int(m[1]) - 1}.patch_embedding.{part}.{m[3]}",)
  if m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)\.(\w+)", key):
    prefix = f"pvt_v2.encoder.layers.{int(m[1]) - 1}.blocks.{m[2]}."
    if m[3] == "attn.kv":
      return (f"{prefix}attention.key.{m[4]}", f"{prefix}attention.value.{m[4]}")
    return (f"{prefix}{_HF_BLOCK_PARTS[m[3]]}.{m[4]}",)
  if m := re.fullmatch(r"norm(\d)\.(\w+)", key):
    return (f"pvt_v2.encoder.layers.{int(m[1]) - 1}.layer_norm.{m[2]}",)
  return (key.replace("head.", "classifier.", 1),)


_RENAMES = {"official": lambda key: (key,), "timm": _official_to_timm, "hf": _official_to_hf}


def rename(official_key: str, fmt: str) -> tuple[str, ...]:
  """The key(s) of `fmt` holding an official key; two for HF's split key/value."""
  return _RENAMES[fmt](official_key)


V1_KEYS = (*(f"pos_embed{stage}" for stage in range(1, 5)), "cls_token", "norm.weight",
           "norm.bias")


def _every_official_key(fmt: str):
  if fmt == "official":
    yield from V1_KEYS
  max_depth = max(max(v.depths) for v in VARIANTS.values())
  for stage in range(1, 5):
    for layer in ("proj", "norm"):
      yield from (f"patch_embed{stage}.{layer}.weight", f"patch_embed{stage}.{layer}.bias")
    for block in range(max_depth):
      for part in _BLOCK_PARTS:
        yield from (f"block{stage}.{block}.{part}.weight", f"block{stage}.{block}.{part}.bias")
    yield from (f"norm{stage}.weight", f"norm{stage}.bias")
  yield from ("head.weight", "head.bias")


@functools.cache
def _reverse(fmt: str) -> dict[str, tuple[str, int]]:
  """key of `fmt` -> (official key, which part of it: 0, or 1 for HF's value rows)."""
  return {name: (key, part) for key in _every_official_key(fmt)
          for part, name in enumerate(rename(key, fmt))}


def official_name(key: str, fmt: str) -> str | None:
  """The official key a key of `fmt` belongs to, or None if no PVT v2 model has it."""
  found = _reverse(fmt).get(key)
  return found and found[0]


def detect_format(keys) -> str:
  """The layout whose names cover most of `keys` (leftovers are reported as unexpected later)."""
  keys = list(keys)
  hits = {fmt: sum(key in _reverse(fmt) for key in keys) for fmt in FORMATS}
  # `head.*` is spelled the same in official and timm; only the backbone keys tell them apart.
  backbone = {fmt: sum(key in _reverse(fmt) and not key.startswith("head.") for key in keys)
              for fmt in FORMATS}
  best = max(FORMATS, key=lambda fmt: (backbone[fmt], hits[fmt]))
  if not hits[best]:
    sample = ", ".join(sorted(keys)[:3]) or "no keys at all"
    raise CheckpointError(f"unknown checkpoint layout: no official, timm or HF PVT v2 keys "
                          f"(found {sample})")
  return best


def to_official(state_dict: dict, fmt: str) -> dict:
  """Renames a complete state dict of `fmt` to official names (joining HF's key/value rows)."""
  parts = {}
  for key, value in state_dict.items():
    official, part = _reverse(fmt)[key]
    parts.setdefault(official, {})[part] = value
  return {key: np.concatenate([p[0], p[1]]) if len(p) == 2 else p[0] for key, p in parts.items()}


def from_official(state_dict: dict, fmt: str) -> dict:
  """Renames an official state dict to `fmt` (splitting `attn.kv` rows for HF)."""
  out = {}
  for key, value in state_dict.items():
    names = rename(key, fmt)
    for name, rows in zip(names, np.split(value, len(names)), strict=True):
      out[name] = rows
  return out


# Flax kernels are [in, out] and [kh, kw, in / groups, out]; PyTorch weights are [out, in] and
# [out, in / groups, kh, kw]. 1-D `weight`s are LayerNorm scales and keep their layout.
_TORCH_TO_FLAX = {2: (1, 0), 4: (2, 3, 1, 0)}
_FLAX_TO_TORCH = {2: (1, 0), 4: (3, 2, 0, 1)}


def _to_flax_array(value: np.ndarray) -> np.ndarray:
  axes = _TORCH_TO_FLAX.get(value.ndim)
  return value if axes is None else np.ascontiguousarray(value.transpose(axes))


def _to_torch_array(value: np.ndarray) -> np.ndarray:
  axes = _FLAX_TO_TORCH.get(value.ndim)
  return value if axes is None else np.ascontiguousarray(value.transpose(axes))


def _torch_shape(shape: tuple) -> tuple:
  axes = _FLAX_TO_TORCH.get(len(shape))
  return shape if axes is None else tuple(shape[axis] for axis in axes)


def _flax_path(official_key: str, ndim: int) -> tuple[str, ...]:
  key = official_key.replace("mlp.dwconv.dwconv", "mlp.dwconv")
  key = re.sub(r"^patch_embed(\d)\.", r"stage\1.patch_embed.", key)
  key = re.sub(r"^block(\d)\.(\d+)\.", r"stage\1.block\2.", key)
  key = re.sub(r"^norm(\d)\.", r"stage\1.norm.", key)
  key = re.sub(r"^pos_embed(\d)$", r"stage\1.pos_embed", key)
  key = re.sub(r"^cls_token$", "stage4.cls_token", key)
  *path, leaf = key.split(".")
  if leaf == "weight":
    leaf = "scale" if ndim == 1 else "kernel"
  return (*path, leaf)


def _official_key(flax_path: tuple[str, ...]) -> str:
  *path, leaf = flax_path
  key = ".".join([*path, "weight" if leaf in ("kernel", "scale") else leaf])
  key = key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
  key = re.sub(r"^stage(\d)\.patch_embed\.", r"patch_embed\1.", key)
  key = re.sub(r"^stage(\d)\.block(\d+)\.", r"block\1.\2.", key)
  key = re.sub(r"^stage(\d)\.pos_embed$", r"pos_embed\1", key)
  key = re.sub(r"^stage4\.cls_token$", "cls_token", key)
  return re.sub(r"^stage(\d)\.norm\.", r"norm\1.", key)


def official_to_params(state_dict: dict) -> dict:
  """Official state dict (numpy, PyTorch layout) -> our nested Flax params (numpy)."""
  flat = {_flax_path(key, value.ndim): _to_flax_array(value) for key, value in state_dict.items()}
  return traverse_util.unflatten_dict(flat)


def params_to_official(params) -> dict:
  """Our Flax params -> official state dict (numpy, PyTorch layout)."""
  flat = traverse_util.flatten_dict(params)
  return {_official_key(path): _to_torch_array(np.asarray(value)) for path, value in flat.items()}


@functools.cache
def _official_shapes(variant: str, num_classes: int) -> dict[str, tuple]:
  model = create_model(variant, num_classes=num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  shapes = {_official_key(path): _torch_shape(tuple(leaf.shape))
            for path, leaf in traverse_util.flatten_dict(shapes).items()}
  return dict(sorted(shapes.items(), key=lambda item: natural_order(item[0])))


def natural_order(key: str) -> list:
  """block3.6 before block3.10, so errors name the first missing key as a person would."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def expected_shapes(variant: str, num_classes: int, fmt: str) -> dict[str, tuple]:
  """Every key of a `fmt` state dict for this variant (head iff num_classes > 0) and its shape."""
  out = {}
  for key, shape in _official_shapes(variant, num_classes).items():
    names = rename(key, fmt)
    for name in names:
      out[name] = (shape[0] // len(names), *shape[1:])
  return out
