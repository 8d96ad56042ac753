"""Classify images with a checkpoint: the top-k classes of each, with names where known.

  python -m pvt_jax.predict --checkpoint=converted/pvt_v2_b0 cat.jpg photos/
  python -m pvt_jax.predict --checkpoint=runs/b0 --top_k=3 shirt.png   # a training workdir

A converted checkpoint (python -m pvt_jax.convert) sees the official ImageNet eval transform
(224 px, crop 0.875) and, for its 1000 classes, ImageNet's class names (from timm's lists,
when installed); a training workdir its own config's image size and crop, the class names its
dataset.json recorded, and its best checkpoint (by the task's metric) or --step. A folder
stands for the images directly in it.
"""

# ruff: noqa: E402  (run as a tool, re-exec under tcmalloc before the heavy imports)
from pvt_jax.cpu import allocator

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()

import importlib.util
import os

import jax
import numpy as np
import tensorflow as tf
from absl import app, flags

from pvt_jax import tasks
from pvt_jax.checkpoints import load_converted
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.data import DatasetError, augment
from pvt_jax.models import create_model
from pvt_jax.train import checkpointing, cli, workdir

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "a converted checkpoint directory or a training workdir")
flags.mark_flag_as_required("checkpoint")
_TOP_K = flags.DEFINE_integer("top_k", 5, "classes shown per image", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "training workdir: this step instead of the best")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class Classifier:
  """A classification model, its variables, the eval transform's size and crop, class names."""

  def __init__(self, path: str, step: int | None = None):
    if not os.path.isdir(path):
      raise CheckpointError("no such checkpoint directory", path)
    if os.path.isfile(os.path.join(path, workdir.CONFIG_FILE)):
      self._from_workdir(path, step)
    else:
      self._from_converted(path)
    self._logits = jax.jit(self.model.apply)

  def _from_converted(self, path: str) -> None:
    checkpoint = load_converted(path)
    if checkpoint.task != "classification":
      raise CheckpointError(f"a {checkpoint.task} checkpoint; predict classifies images", path)
    num_classes = checkpoint.metadata["num_classes"]
    self.model = create_model(checkpoint.metadata["variant"], num_classes=num_classes)
    self.variables = checkpoint.variables
    self.image_size, self.crop_pct = 224, 0.875
    self.class_names = checkpoint.metadata.get("class_names") or _imagenet_names(num_classes)

  def _from_workdir(self, path: str, step: int | None) -> None:
    config = workdir.load_run_config(path)
    if config.get("task", "classification") != "classification":
      raise CheckpointError(f"a {config.task} workdir; predict classifies images", path)
    task = tasks.get_task("classification")
    self.model = task.create_model(config, config.num_classes)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: task.init_variables(self.model, config, jax.random.key(0)))
    abstract = checkpointing.abstract_like(shapes, jax.tree.map(lambda _: device, shapes))
    ckpts = checkpointing.TrainCheckpoints(path, task.best_metric, read_only=True)
    try:
      step = step if step is not None else (ckpts.best_step() or ckpts.latest_step())
      if step is None or step not in ckpts.all_steps():
        raise CheckpointError(f"no checkpoint for step {step}", path)
      self.variables = ckpts.restore_part(abstract, step)
    finally:
      ckpts.close()
    self.image_size, self.crop_pct = config.image_size, config.get("crop_pct", 0.875)
    record = workdir.load_dataset_record(path) or {}
    self.class_names = record.get("class_names")

  def preprocess(self, path: str) -> np.ndarray:
    """The eval transform of the training pipeline on one image file: [size, size, 3]."""
    try:
      with open(path, "rb") as f:
        image = tf.io.decode_image(f.read(), channels=3, expand_animations=False)
    except tf.errors.OpError:  # unknown format, truncated or corrupt data
      raise DatasetError(f"{path} is not an image (cannot decode it)") from None
    image = augment.resize_center_crop(tf.cast(image, tf.float32), self.image_size, self.crop_pct)
    return augment.normalize(image).numpy()

  def top_k(self, path: str, k: int) -> list[tuple[float, str]]:
    """(probability, class name or index) of the k likeliest classes, most likely first."""
    logits = self._logits(self.variables, self.preprocess(path)[None])[0]
    probabilities = np.asarray(jax.nn.softmax(logits))
    best = np.argsort(-probabilities)[:k]
    names = self.class_names
    return [(float(probabilities[i]), names[i] if names else f"class {i}") for i in best]


def _imagenet_names(num_classes: int) -> list[str] | None:
  """ImageNet-1k's class names (WordNet lemmas) for a 1000-class head, from the lists timm (the
  torch extra) ships. Read as files: importing timm (torch) once TensorFlow is loaded crashes
  with this stack (see tests/conftest.py), and no other installed package has them."""
  spec = importlib.util.find_spec("timm") if num_classes == 1000 else None
  if spec is None:
    return None
  folder = os.path.join(spec.submodule_search_locations[0], "data", "_info")
  with open(os.path.join(folder, "imagenet_synsets.txt")) as f:
    synsets = f.read().split()
  with open(os.path.join(folder, "imagenet_synset_to_lemma.txt")) as f:
    lemmas = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
  return [lemmas[synset] for synset in synsets]


def image_paths(arguments: list[str]) -> list[str]:
  """The image files named, a folder standing for the images directly in it (sorted)."""
  paths = []
  for argument in arguments:
    if os.path.isdir(argument):
      found = sorted(os.path.join(argument, name) for name in os.listdir(argument)
                     if name.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {argument}")
      paths += found
    elif os.path.isfile(argument):
      paths.append(argument)
    else:
      raise DatasetError(f"no such image or folder: {argument}")
  return paths


def main(argv) -> None:
  if len(argv) < 2:
    cli.fail("no images given: python -m pvt_jax.predict --checkpoint=DIR IMAGE_OR_FOLDER...")
  cli.quiet_logging()
  try:
    paths = image_paths(argv[1:])  # before the checkpoint is read: a typo fails at once
    classifier = Classifier(os.path.abspath(_CHECKPOINT.value), _STEP.value)
    for path in paths:
      top = classifier.top_k(path, _TOP_K.value)
      print(path)
      for probability, name in top:
        print(f"  {probability:7.2%}  {name}", flush=True)
  except cli.USER_ERRORS as error:
    cli.fail(str(error))


def run() -> None:
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
