"""A training workdir's own records and the checks made on it before anything is written.

  <workdir>/config.json    the run's config (num_classes resolved), what `evaluate` and resuming
                           read
  <workdir>/dataset.json   the dataset's name, splits, sizes and class names (for predictions)

A workdir that holds checkpoints belongs to its config: starting another config in it is refused
with the differing fields named, except for the fields in RESUMABLE, which only say how long to
train, how often to log, evaluate and save, where the data are and how the machine is laid out.
"""

import json
import os
import uuid

import ml_collections
from flax import traverse_util

from pvt_jax import tasks
from pvt_jax.train.checkpointing import CHECKPOINT_SUBDIR
from pvt_jax.train.errors import ConfigError

CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"

# May differ when a run is resumed. Training longer (num_train_steps / num_epochs) stretches the
# learning-rate schedule from the resumed step on; grad_accum_steps and the mesh give the same
# updates to rounding; the rest does not touch the trajectory.
RESUMABLE = frozenset({
    "num_train_steps", "num_epochs", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "progress_bar", "reevaluate", "profile_steps",
    "data_dir", "manual_dir", "fashion_mnist_dir", "mesh.data", "mesh.fsdp", "grad_accum_steps",
    "eval_batch_size", "init_from",
})
SCHEDULE_LENGTH = ("num_train_steps", "num_epochs")


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json holds it (tuples as lists, references resolved)."""
  return json.loads(config.copy_and_resolve_references().to_json_best_effort())


def load_config(workdir: str) -> dict:
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return json.load(f)


def _fill(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  for name, value in defaults.items():
    if name not in config:
      config[name] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(config[name],
                                                                     ml_collections.ConfigDict):
      _fill(config[name], value)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config, with the fields that its config.json predates at their defaults."""
  config = ml_collections.ConfigDict(load_config(workdir))
  _fill(config, tasks.get_task(config.get("task", "classification")).default_config(
      config.variant))
  return config


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def differences(saved: dict, config: ml_collections.ConfigDict) -> dict:
  """field -> (saved value, new value) for the fields that differ. Fields that only one side
  has (written by another version) and num_classes 0 (the dataset's, resolved later) are left
  out."""
  old, new = (traverse_util.flatten_dict(c, sep=".") for c in (saved, as_json(config)))
  return {field: (old[field], value) for field, value in new.items()
          if field in old and old[field] != value
          and not (field == "num_classes" and value == 0)}


def _check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and writes (then removes) a probe file in it."""
  probe = os.path.join(workdir, f".write-probe-{uuid.uuid4().hex}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("probe")
    os.remove(probe)
  except OSError as error:
    raise ConfigError(f"workdir {workdir}: cannot write there "
                      f"({error.strerror or type(error).__name__})") from None


def check(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """Before a run opens its data: the workdir is writable and, if it holds checkpoints, was
  written by this config up to RESUMABLE fields. Returns notes on the resumable fields that
  changed."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} is a file, not a directory")
  _check_writable(workdir)
  if not (has_checkpoints(workdir) and os.path.isfile(os.path.join(workdir, CONFIG_FILE))):
    return []
  try:
    saved = load_config(workdir)
  except (OSError, ValueError) as error:
    raise ConfigError(f"workdir {workdir} has checkpoints but an unreadable {CONFIG_FILE} "
                      f"({error})") from None
  changed = differences(saved, config)
  fixed = {field: values for field, values in changed.items() if field not in RESUMABLE}
  if fixed:
    listed = ", ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in fixed.items())
    raise ConfigError(f"workdir {workdir} holds checkpoints of another config ({listed}); "
                      f"use another --workdir (only {', '.join(SCHEDULE_LENGTH)}, intervals, "
                      f"data paths, the mesh and grad_accum_steps may change on resume)")
  notes = [f"{field} changed {old!r} -> {new!r}" for field, (old, new) in changed.items()]
  if any(field in changed for field in SCHEDULE_LENGTH):
    notes.append("the learning-rate schedule now ends at the new last step")
  return notes


def check_num_classes(workdir: str, num_classes: int) -> None:
  """The dataset's class count (known once it is opened) against the workdir's checkpoints."""
  if has_checkpoints(workdir) and os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    saved = load_config(workdir).get("num_classes", num_classes)
    if saved != num_classes:
      raise ConfigError(f"workdir {workdir} holds checkpoints of another config (num_classes "
                        f"{saved} -> {num_classes}); use another --workdir")


def _write_json(path: str, value: dict) -> None:
  """All or nothing: a crash mid-write leaves the previous file."""
  partial = f"{path}.partial-{uuid.uuid4().hex}"
  with open(partial, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(partial, path)


def write_records(workdir: str, config: ml_collections.ConfigDict, num_classes: int,
                  dataset_record: dict) -> None:
  """config.json (with the resolved num_classes) and dataset.json."""
  resolved = as_json(config)
  resolved["num_classes"] = num_classes
  _write_json(os.path.join(workdir, CONFIG_FILE), resolved)
  _write_json(os.path.join(workdir, DATASET_FILE), dataset_record)


def load_dataset_record(workdir: str) -> dict | None:
  """dataset.json of a workdir (class names, splits), or None for one written before it."""
  path = os.path.join(workdir, DATASET_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)
