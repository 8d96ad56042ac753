"""PyTorch state dict <-> our params: variant detection, validation against the variant's keys and
shapes, and the layout changes. All checks name the offending key in the checkpoint's own layout."""

import dataclasses
from typing import ClassVar

import numpy as np

from pvt_jax.checkpoints import layouts
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.checkpoints.files import read_state_dict
from pvt_jax.models import VARIANTS, model_name


@dataclasses.dataclass(frozen=True)
class Conversion:
  """A validated checkpoint: our params and the official state dict they came from (fp32)."""
  params: dict
  state_dict: dict
  variant: str
  num_classes: int
  source_format: str
  task: ClassVar[str] = "classification"

  @property
  def variables(self) -> dict:
    return {"params": self.params}


def _architecture(shapes: dict) -> dict:
  """What official-named key shapes say about the architecture (None where a key is missing)."""
  def rows(key):
    return shapes[key][0] if key in shapes else None

  dims = [rows(f"patch_embed{i}.proj.weight") for i in range(1, 5)]
  depths = [len({key.split(".")[1] for key in shapes if key.startswith(f"block{i}.")})
            for i in range(1, 5)]
  hidden = [rows(f"block{i}.0.mlp.fc1.weight") for i in range(1, 5)]
  ratios = [h // d if h and d else None for h, d in zip(hidden, dims, strict=True)]
  stem = shapes.get("patch_embed1.proj.weight")
  return {"embed dims": tuple(dims), "depths": tuple(depths), "mlp ratios": tuple(ratios),
          "linear": "block4.0.attn.sr.weight" in shapes,
          "overlapping patches": stem is not None and len(stem) == 4 and stem[2] > 4,
          "conv ffn": "block1.0.mlp.dwconv.dwconv.weight" in shapes,
          "position embedding": "pos_embed1" in shapes}


_SWITCHES = ("linear", "overlapping patches", "conv ffn", "position embedding")


def _describe(variant: str) -> dict:
  v = VARIANTS[variant]
  return {"embed dims": tuple(v.embed_dims), "depths": tuple(v.depths),
          "mlp ratios": tuple(v.mlp_ratios), "linear": v.linear,
          "overlapping patches": v.overlapping_patches, "conv ffn": v.conv_ffn,
          "position embedding": v.position_embedding}


def detect_variant(shapes: dict) -> str:
  """The variant whose embed dims, depths, mlp ratios, attention, patch embedding, FFN and
  position embedding (v1 or v2) best fit the shapes."""
  found = _architecture(shapes)

  def agreement(variant):
    expected = _describe(variant)
    score = sum(found[key] == expected[key] for key in _SWITCHES)
    for key in ("embed dims", "depths", "mlp ratios"):
      score += sum(a == b for a, b in zip(found[key], expected[key], strict=True))
    return score

  return max(VARIANTS, key=agreement)


def check_keys(state_dict: dict, expected: dict, model: str) -> None:
  """Every expected key present with its shape, nothing else, all floating point; the first
  problem is raised, naming the key and `model` (e.g. "pvt_v2_b0")."""
  missing = [key for key in expected if key not in state_dict]
  unexpected = [key for key in state_dict if key not in expected]

  def more(keys):
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

  if missing:
    raise CheckpointError(f"missing key {missing[0]}{more(missing)} for {model}")
  if unexpected:
    raise CheckpointError(f"unexpected key {unexpected[0]}{more(unexpected)} for {model}")
  for key, value in state_dict.items():
    shape = expected[key]
    if tuple(value.shape) != shape:
      raise CheckpointError(f"{key} has shape {list(value.shape)}, {model} expects "
                            f"{list(shape)}")
    if not np.issubdtype(value.dtype, np.floating):
      raise CheckpointError(f"{key} has dtype {value.dtype}, expected floating point")


def convert_state_dict(state_dict: dict, variant: str | None = None) -> Conversion:
  """Validates an official/timm/HF PVT v2 state dict (numpy arrays) and converts it.

  `variant` (optional) is checked against the one the shapes imply. The number of classes is the
  head's row count, 0 for a headless backbone.
  """
  fmt = layouts.detect_format(state_dict)
  shapes = {}
  for key, value in state_dict.items():
    if (official := layouts.official_name(key, fmt)) is not None:
      shapes[official] = tuple(value.shape)
  detected = detect_variant(shapes)
  head = shapes.get("head.weight") or shapes.get("head.bias")
  num_classes = head[0] if head else 0
  chosen = variant or detected
  if chosen not in VARIANTS:
    raise CheckpointError(f"unknown variant {chosen!r}; choose one of {', '.join(VARIANTS)}")
  try:
    check_keys(state_dict, layouts.expected_shapes(chosen, num_classes, fmt), model_name(chosen))
  except CheckpointError as error:
    hint = ""
    if variant and detected != variant:
      found = _architecture(shapes)
      hint = (f"; the checkpoint is {model_name(detected)}" if found == _describe(detected) else
              "; the checkpoint has " + ", ".join(f"{k} {v}" for k, v in found.items()))
    raise CheckpointError(f"{error.message} ({fmt} layout{hint})") from None
  official = {key: np.asarray(value, np.float32)
              for key, value in layouts.to_official(state_dict, fmt).items()}
  return Conversion(layouts.official_to_params(official), official, chosen, num_classes, fmt)


def convert_file(path, variant: str | None = None) -> Conversion:
  """`convert_state_dict` of a checkpoint file; errors name the file."""
  try:
    return convert_state_dict(read_state_dict(path), variant)
  except CheckpointError as error:
    raise error.at(path) from None


def export_state_dict(params, fmt: str) -> dict:
  """Our params -> a state dict (numpy) in the official, timm or HF layout (PVT v1: official)."""
  official = layouts.params_to_official(params)
  if fmt != "official" and (v1_keys := [key for key in layouts.V1_KEYS if key in official]):
    raise CheckpointError(f"the {fmt} layout has no PVT v1 keys (such as {v1_keys[0]}); export "
                          f"PVT v1 in the official layout")
  return layouts.from_official(official, fmt)
