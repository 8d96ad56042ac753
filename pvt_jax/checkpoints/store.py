"""Converted checkpoints on disk (orbax) and loading them, or raw PyTorch files, into a model."""

import dataclasses
import os
import shutil
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pvt_jax.checkpoints.conversion import convert_file
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.models import VARIANTS, create_model
from pvt_jax.models.pvt_v2 import linear_init

FORMAT_VERSION = 1
METADATA_KEYS = ("variant", "num_classes", "source_file", "source_sha256", "source_format")


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
  """Params (numpy, our Flax tree) and metadata (METADATA_KEYS plus `format_version`)."""
  params: dict
  metadata: dict


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_converted(directory, params, metadata: dict) -> None:
  """Writes params + metadata as an orbax checkpoint; all or nothing.

  The checkpoint is built in a hidden sibling directory and renamed into place, so a failure (or a
  crash) never leaves a partial `directory`.
  """
  directory = os.path.abspath(os.fspath(directory))
  missing = [key for key in METADATA_KEYS if key not in metadata]
  if missing:
    raise CheckpointError(f"metadata lacks {', '.join(missing)}", directory)
  if os.path.exists(directory):
    raise CheckpointError("already exists; remove it or choose another output", directory)
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex}")
  items = ocp.args.Composite(
      params=ocp.args.StandardSave(jax.tree.map(np.asarray, params)),
      metadata=ocp.args.JsonSave({**metadata, "format_version": FORMAT_VERSION}))
  try:
    _checkpointer().save(staging, args=items)
    os.rename(staging, directory)
  finally:
    for leftover in os.listdir(parent):  # orbax stages its own writes beside `staging`
      if leftover.startswith(os.path.basename(staging)):
        shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)


def load_converted(directory) -> ConvertedCheckpoint:
  """Reads a checkpoint written by `save_converted` (params come back as numpy arrays)."""
  directory = os.path.abspath(os.fspath(directory))
  if not all(os.path.isdir(os.path.join(directory, item)) for item in ("params", "metadata")):
    raise CheckpointError("not a converted pvt_jax checkpoint (needs params/ and metadata/; "
                          "convert PyTorch files with python -m pvt_jax.convert)", directory)
  try:
    restored = _checkpointer().restore(directory, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
  except (OSError, ValueError, KeyError) as error:
    raise CheckpointError(f"unreadable converted checkpoint ({error})", directory) from None
  metadata = dict(restored["metadata"])
  version = metadata.get("format_version")
  if version != FORMAT_VERSION or metadata.get("variant") not in VARIANTS:
    raise CheckpointError(f"unsupported converted checkpoint (format_version {version}, variant "
                          f"{metadata.get('variant')!r})", directory)
  return ConvertedCheckpoint(restored["params"], metadata)


def num_head_classes(params) -> int:
  """Classes of the head in `params`; 0 when there is none."""
  return int(params["head"]["bias"].shape[0]) if "head" in params else 0


def replace_head(params, num_classes: int, rng=None, *, keep: bool = True,
                 new_head=None) -> dict:
  """Params for a `num_classes` model. The stored head is kept when `keep` is set and its size
  fits; with 0 classes there is none; otherwise the head is `new_head` (e.g. a model's own
  initialisation) or, without it, freshly initialised from `rng` (default key 0) as the official
  code does (truncated normal std .02, zero bias)."""
  if keep and num_head_classes(params) == num_classes:
    return params
  body = {name: value for name, value in params.items() if name != "head"}
  if num_classes == 0:
    return body
  if new_head is None:
    width = body["stage4"]["norm"]["scale"].shape[0]
    rng = jax.random.key(0) if rng is None else rng
    head = nn.Dense(num_classes, kernel_init=linear_init).init(rng, jnp.zeros((1, width)))
    new_head = jax.tree.map(np.asarray, head["params"])
  return {**body, "head": new_head}


def load_pretrained(path, *, num_classes: int | None = None, rng=None, **model_kwargs):
  """(model, variables) from a converted checkpoint directory or a PyTorch/safetensors file.

  `num_classes` defaults to the checkpoint's. When it differs from the head stored in the
  checkpoint (e.g. converted with --num_classes, or for fine-tuning), the head is dropped (0) or
  initialised from `rng` (default key 0). Other keyword arguments go to `create_model`.
  """
  if os.path.isdir(path):
    checkpoint = load_converted(path)
    params, variant = checkpoint.params, checkpoint.metadata["variant"]
    stored_classes = checkpoint.metadata["num_classes"]
  else:
    conversion = convert_file(path)
    params, variant, stored_classes = conversion.params, conversion.variant, conversion.num_classes
  num_classes = stored_classes if num_classes is None else num_classes
  model = create_model(variant, num_classes=num_classes, **model_kwargs)
  return model, {"params": replace_head(params, num_classes, rng)}

