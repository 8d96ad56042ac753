"""Dense-prediction checkpoints (mmseg/mmdet layouts) <-> our variables ({'params', 'batch_stats'}).

An OpenMMLab detector or segmentor state dict is `backbone.*` (the official PVT v2 names) plus its
neck and head modules. A layout here is one row of `DENSE_LAYOUTS`: the key prefixes that identify
it, the key whose rows count the classes, the task, and the model to build; every other name
follows from one rule, so each layout is a row (mmseg Semantic FPN: `neck.*`, `decode_head.*`;
mmdet RetinaNet: `neck.*`, `bbox_head.*`, its classifier a row per anchor and class):

  backbone.<official key>             -> params/backbone/...   (the classification converter)
  neck.fpn_convs.3.conv.weight        -> params/neck/fpn_convs_3/conv/kernel  (HWIO)
  decode_head.scale_heads.2.2.bn.weight / .running_mean
                                      -> params/.../bn/scale,  batch_stats/.../bn/mean
  *.num_batches_tracked               -> kept in the converted checkpoint's metadata, so an
                                         export reproduces the file (our BN does not count).

i.e. a numbered `nn.ModuleList` / `nn.Sequential` entry `name.i.j` is our module `name_i_j`.
"""

import dataclasses
import re
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util

from pvt_jax.checkpoints import conversion, layouts
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.checkpoints.files import read_state_dict
from pvt_jax.models import VARIANTS
from pvt_jax.models.retinanet import NUM_ANCHORS, create_retinanet
from pvt_jax.models.semantic_fpn import create_semantic_fpn, init_shapes

BACKBONE = "backbone."
_COUNTER = "num_batches_tracked"
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


@dataclasses.dataclass(frozen=True)
class DenseLayout:
  """How one library's checkpoints of one task are spelled."""
  name: str  # the --export name and the converted checkpoint's source_format
  task: str  # config.task of the model
  prefixes: tuple[str, ...]  # top-level modules besides the backbone (all must be present)
  classifier: str  # the key whose first dimension counts the classes
  create_model: Callable  # (variant, num_classes) -> the flax model
  rows_per_class: int = 1  # the classifier's rows per class (RetinaNet: one per anchor)


DENSE_LAYOUTS = {
    "mmseg": DenseLayout("mmseg", "segmentation", ("neck.", "decode_head."),
                         "decode_head.conv_seg.weight", create_semantic_fpn),
    "mmdet": DenseLayout("mmdet", "detection", ("neck.", "bbox_head."),
                         "bbox_head.retina_cls.weight", create_retinanet,
                         rows_per_class=NUM_ANCHORS),
}


@dataclasses.dataclass(frozen=True)
class DenseConversion:
  """A validated dense checkpoint: our variables, the source tensors (fp32, counters aside), the
  BN counters by key, and what was detected."""
  variables: dict
  state_dict: dict
  num_batches_tracked: dict
  variant: str
  num_classes: int
  layout: DenseLayout

  @property
  def task(self) -> str:
    return self.layout.task

  @property
  def source_format(self) -> str:
    return self.layout.name


def detect_layout(keys) -> DenseLayout | None:
  """The dense layout of a state dict with these keys, or None (a classification checkpoint)."""
  keys = list(keys)
  if not any(key.startswith(BACKBONE) for key in keys):
    return None
  for layout in DENSE_LAYOUTS.values():
    if all(any(key.startswith(prefix) for key in keys) for prefix in layout.prefixes):
      return layout
  return None


def _module_path(key: str) -> list[str]:
  """`decode_head.scale_heads.2.2.bn` -> ['decode_head', 'scale_heads_2_2', 'bn']."""
  path = []
  for part in key.split("."):
    if part.isdigit() and path:
      path[-1] += f"_{part}"
    else:
      path.append(part)
  return path


def _module_key(path) -> str:
  return ".".join(re.sub(r"_(\d+(?:_\d+)*)$", lambda m: "." + m[1].replace("_", "."), name)
                  for name in path)


def _flax_location(key: str, ndim: int) -> tuple[str, tuple[str, ...]]:
  """(collection, path) of a non-backbone key."""
  *modules, leaf = key.split(".")
  path = _module_path(".".join(modules))
  if leaf in _BN_STATS:
    return "batch_stats", (*path, _BN_STATS[leaf])
  if leaf == "weight":
    leaf = "kernel" if ndim > 1 else "scale"
  return "params", (*path, leaf)


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  *modules, leaf = path
  if collection == "batch_stats":
    leaf = {ours: theirs for theirs, ours in _BN_STATS.items()}[leaf]
  elif leaf in ("kernel", "scale"):
    leaf = "weight"
  return f"{_module_key(modules)}.{leaf}"


def _torch_array(value: np.ndarray) -> np.ndarray:
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


def _flax_array(value: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if value.ndim == 4 else value


def expected_shapes(layout: DenseLayout, variant: str, num_classes: int) -> dict[str, tuple]:
  """Every floating-point key of the layout's state dict for this model, with its shape."""
  shapes = {BACKBONE + key: shape
            for key, shape in layouts.expected_shapes(variant, 0, "official").items()}
  variables = init_shapes(layout.create_model(variant, num_classes), (32, 32))
  for collection, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      if path[0] != "backbone":
        shape = tuple(leaf.shape)
        shapes[_torch_key(collection, path)] = (
            (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape)
  return shapes


def convert_state_dict(state_dict: dict, variant: str | None = None) -> DenseConversion:
  """Validates a dense-layout state dict (numpy arrays) and converts it; one-line errors name the
  offending key. `variant` (optional) is checked against the backbone's shapes."""
  layout = detect_layout(state_dict)
  if layout is None:
    raise CheckpointError("not a dense checkpoint layout (needs backbone.* and the keys of "
                          + " or ".join("/".join(p + "*" for p in layout.prefixes)
                                        for layout in DENSE_LAYOUTS.values()) + ")")
  counters = {key: value for key, value in state_dict.items() if key.endswith(_COUNTER)}
  tensors = {key: value for key, value in state_dict.items() if key not in counters}
  backbone_shapes = {key[len(BACKBONE):]: tuple(value.shape) for key, value in tensors.items()
                     if key.startswith(BACKBONE)}
  detected = conversion.detect_variant(backbone_shapes)
  chosen = variant or detected
  if chosen not in VARIANTS:
    raise CheckpointError(f"unknown variant {chosen!r}; choose one of {', '.join(VARIANTS)}")
  if layout.classifier not in tensors:
    raise CheckpointError(f"missing key {layout.classifier} ({layout.name} layout)")
  num_classes = int(tensors[layout.classifier].shape[0]) // layout.rows_per_class
  expected = expected_shapes(layout, chosen, num_classes)
  try:
    conversion.check_keys(tensors, expected, f"{layout.name} {layout.task} pvt_v2_{chosen}")
    _check_counters(counters, expected)
  except CheckpointError as error:
    hint = f"; the backbone is pvt_v2_{detected}" if variant and detected != variant else ""
    raise CheckpointError(f"{error.message} ({layout.name} layout{hint})") from None
  tensors = {key: np.asarray(value, np.float32) for key, value in tensors.items()}
  backbone = {key[len(BACKBONE):]: value for key, value in tensors.items()
              if key.startswith(BACKBONE)}
  flat = {("params", "backbone", *path): value for path, value in
          traverse_util.flatten_dict(layouts.official_to_params(backbone)).items()}
  for key, value in tensors.items():
    if not key.startswith(BACKBONE):
      collection, path = _flax_location(key, value.ndim)
      flat[(collection, *path)] = _flax_array(value)
  variables = traverse_util.unflatten_dict(flat)
  return DenseConversion(variables, tensors, {key: int(value) for key, value in counters.items()},
                         chosen, num_classes, layout)


def convert_any_file(path, variant: str | None = None):
  """A checkpoint file converted by its layout: a `DenseConversion` for dense layouts, else the
  classification `Conversion`; errors name the file."""
  state_dict = read_state_dict(path)
  convert = convert_state_dict if detect_layout(state_dict) else conversion.convert_state_dict
  try:
    return convert(state_dict, variant)
  except CheckpointError as error:
    raise error.at(path) from None


def create_model(task: str, variant: str, num_classes: int, **kwargs):
  """The dense model of `task` ("segmentation", ...), as its layouts build it."""
  for layout in DENSE_LAYOUTS.values():
    if layout.task == task:
      return layout.create_model(variant, num_classes, **kwargs)
  raise CheckpointError(f"no model for task {task!r}")


def _check_counters(counters: dict, expected: dict) -> None:
  """One `num_batches_tracked` (an integer scalar) per BN layer, none elsewhere."""
  wanted = {key.rsplit(".", 1)[0] + "." + _COUNTER for key in expected
            if key.endswith(".running_mean")}
  for key, value in counters.items():
    if key not in wanted:
      raise CheckpointError(f"unexpected key {key}")
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise CheckpointError(f"{key} has shape {list(value.shape)} and dtype {value.dtype}, "
                            f"expected an integer scalar")
  missing = sorted(wanted - set(counters), key=layouts.natural_order)
  if missing:
    raise CheckpointError(f"missing key {missing[0]}")


def export_state_dict(variables: dict, layout: str, num_batches_tracked: dict | None = None):
  """Our variables -> a state dict (numpy) in the layout, with a `num_batches_tracked` per BN
  (the stored counters of a converted checkpoint, else 0)."""
  layout = DENSE_LAYOUTS[layout]
  num_batches_tracked = num_batches_tracked or {}
  params = jax.tree.map(np.asarray, dict(variables["params"]))
  out = {BACKBONE + key: value
         for key, value in layouts.params_to_official(params.pop("backbone")).items()}
  for collection, tree in (("params", params), ("batch_stats", variables.get("batch_stats", {}))):
    for path, value in traverse_util.flatten_dict(jax.tree.map(np.asarray, tree)).items():
      key = _torch_key(collection, path)
      out[key] = np.ascontiguousarray(_torch_array(value))
      if key.endswith(".running_mean"):
        counter = key[:-len("running_mean")] + _COUNTER
        out[counter] = np.asarray(num_batches_tracked.get(counter, 0), np.int64)
  return dict(sorted(out.items(), key=lambda item: layouts.natural_order(item[0])))


def with_backbone(params: dict, checkpoint, variant: str) -> dict:
  """`params` of a dense model with its 'backbone' subtree taken from a converted checkpoint
  (`load_converted`): a classification checkpoint (its head is dropped) or a dense one."""
  found = checkpoint.metadata["variant"]
  if found != variant:
    raise CheckpointError(f"init_from holds pvt_v2_{found}, the model is pvt_v2_{variant}")
  source = checkpoint.params
  if "backbone" in source:
    source = source["backbone"]
  backbone = {name: value for name, value in source.items() if name != "head"}
  def shapes(tree):
    return {path: np.shape(leaf) for path, leaf in traverse_util.flatten_dict(tree).items()}

  if shapes(backbone) != shapes(params["backbone"]):
    raise CheckpointError(f"init_from's pvt_v2_{found} backbone does not fit the model's "
                          f"parameter tree")
  return {**params, "backbone": jax.tree.map(np.asarray, backbone)}
