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

from pvt_jax.checkpoints import dense
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.models import VARIANTS, create_model
from pvt_jax.models.pvt_v2 import linear_init

FORMAT_VERSION = 1
METADATA_KEYS = ("variant", "num_classes", "source_file", "source_sha256", "source_format")


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
  """Params (numpy, our Flax tree), metadata (METADATA_KEYS plus `format_version`, and `task`
  where written by a version that records it), and BatchNorm statistics of dense models."""
  params: dict
  metadata: dict
  batch_stats: dict | None = None

  @property
  def task(self) -> str:
    """The model's task: "classification" (also for checkpoints from before tasks were recorded),
    "segmentation", ..."""
    return self.metadata.get("task", "classification")

  @property
  def variables(self) -> dict:
    """{'params'} or {'params', 'batch_stats'}, for `model.apply`."""
    extra = {"batch_stats": self.batch_stats} if self.batch_stats is not None else {}
    return {"params": self.params, **extra}


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_converted(directory, params, metadata: dict, batch_stats=None) -> None:
  """Writes params + metadata (+ BatchNorm statistics) as an orbax checkpoint; all or nothing.

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
  items = {"params": ocp.args.StandardSave(jax.tree.map(np.asarray, params)),
           "metadata": ocp.args.JsonSave({**metadata, "format_version": FORMAT_VERSION})}
  if batch_stats is not None:
    items["batch_stats"] = ocp.args.StandardSave(jax.tree.map(np.asarray, batch_stats))
  items = ocp.args.Composite(**items)
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
  items = {"params": ocp.args.StandardRestore(), "metadata": ocp.args.JsonRestore()}
  if os.path.isdir(os.path.join(directory, "batch_stats")):
    items["batch_stats"] = ocp.args.StandardRestore()
  try:
    restored = _checkpointer().restore(directory, args=ocp.args.Composite(**items))
  except (OSError, ValueError, KeyError) as error:
    raise CheckpointError(f"unreadable converted checkpoint ({error})", directory) from None
  metadata = dict(restored["metadata"])
  version = metadata.get("format_version")
  if version != FORMAT_VERSION or metadata.get("variant") not in VARIANTS:
    raise CheckpointError(f"unsupported converted checkpoint (format_version {version}, variant "
                          f"{metadata.get('variant')!r})", directory)
  batch_stats = restored["batch_stats"] if "batch_stats" in items else None
  return ConvertedCheckpoint(restored["params"], metadata, batch_stats)


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
  Dense checkpoints (e.g. mmseg Semantic FPN) give their dense model and {'params',
  'batch_stats'}; their number of classes cannot change here.
  """
  if os.path.isdir(path):
    checkpoint = load_converted(path)
    task, variant = checkpoint.task, checkpoint.metadata["variant"]
    variables, stored_classes = checkpoint.variables, checkpoint.metadata["num_classes"]
  else:
    conversion = dense.convert_any_file(path)
    task, variant = conversion.task, conversion.variant
    variables, stored_classes = conversion.variables, conversion.num_classes
  if task != "classification":
    if num_classes not in (None, stored_classes):
      raise CheckpointError(f"a {task} checkpoint of {stored_classes} classes cannot be loaded "
                            f"with num_classes={num_classes}; fine-tune from it with init_from",
                            path)
    return dense.create_model(task, variant, stored_classes, **model_kwargs), variables
  num_classes = stored_classes if num_classes is None else num_classes
  model = create_model(variant, num_classes=num_classes, **model_kwargs)
  return model, {"params": replace_head(variables["params"], num_classes, rng)}
