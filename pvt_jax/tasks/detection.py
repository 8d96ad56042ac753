"""Object detection: RetinaNet on PVT v2 (paper Table 3), trained with mmdet's focal + L1 loss and
scored with pycocotools' COCOeval over the whole eval split.

Data come from pvt_jax/data/detection (fixed canvases, padded ground truth); the jitted eval step
returns the 100 best detections of every image of the global batch (fixed size), so each image
arrives once, on every process, and each process runs the same COCOeval. Checkpoints are ranked
by AP. At each eval the detections (COCO results JSON) and a picture of a few eval images with
predicted and ground-truth boxes go into `<workdir>/detections/`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pvt_jax.checkpoints import load_converted, with_backbone
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.configs import detection as detection_configs
from pvt_jax.data import detection as detection_data
from pvt_jax.data.detection import transforms
from pvt_jax.detection import RetinaNetSettings, anchor_head
from pvt_jax.detection.evaluation import METRICS, CocoEvaluator, draw_detections
from pvt_jax.models.retinanet import RetinaNet
from pvt_jax.tasks import base
from pvt_jax.train import sharding
from pvt_jax.train.errors import ConfigError
from pvt_jax.train.validation import DTYPES

OUTPUT_SUBDIR = "detections"  # <workdir>/detections/step_<N>.json and step_<N>.png
# What an eval batch passes through the eval step for the evaluator (besides the detections).
_PASSED_THROUGH = ("image_id", "mask", "scale_factor")


def output_paths(workdir: str, step: int) -> tuple[str, str]:
  """(detections JSON, picture) written by the eval at `step`."""
  stem = os.path.join(workdir, OUTPUT_SUBDIR, f"step_{step}")
  return stem + ".json", stem + ".png"


class DetectionAccumulator(base.EvalAccumulator):
  """COCOeval over the detections of a pass; keeps the first few images of process 0's first
  batches for the picture."""

  def __init__(self, config, split):
    self.evaluator = CocoEvaluator(split.ground_truth, split.category_ids)
    self.class_names = split.class_names
    self.num_visualized = config.detection.num_visualized
    self.visual = {"images": [], "ids": [], "scales": []}
    self.predictions = {}  # image id -> its detections, for the pictured images

  def update(self, outputs, batch: dict) -> None:
    self.evaluator.update(outputs)
    wanted = self.num_visualized - len(self.visual["ids"])
    if wanted <= 0:
      return
    # This process's rows of the global batch, found by image id (whatever the device order).
    mask = np.asarray(batch["mask"], bool)
    local = np.flatnonzero(mask)[:wanted]
    row_of = {int(i): r for r, i in enumerate(outputs["image_id"]) if outputs["mask"][r]}
    pixels = transforms.to_uint8(batch["image"][local], batch["image_size"][local])
    for k, image in zip(local, pixels, strict=True):
      image_id = int(batch["image_id"][k])
      row = row_of[image_id]
      self.visual["images"].append(image)
      self.visual["ids"].append(image_id)
      self.visual["scales"].append(np.asarray(batch["scale_factor"][k]))
      self.predictions[image_id] = {name: np.asarray(outputs[name][row])
                                    for name in ("boxes", "scores", "labels", "valid")}

  def result(self) -> dict:
    return self.evaluator.result()

  def write_files(self, workdir: str, step: int) -> None:
    json_path, png_path = output_paths(workdir, step)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    self.evaluator.save_detections(json_path)
    if not self.visual["ids"]:
      return
    # One canvas for all pictured images: each image in the top-left corner of the largest.
    height = max(image.shape[0] for image in self.visual["images"])
    width = max(image.shape[1] for image in self.visual["images"])
    images = np.zeros((len(self.visual["images"]), height, width, 3), np.uint8)
    for k, image in enumerate(self.visual["images"]):
      images[k, :image.shape[0], :image.shape[1]] = image
    detections = {name: np.stack([self.predictions[i][name] for i in self.visual["ids"]])
                  for name in ("boxes", "scores", "labels", "valid")}
    truth = self.evaluator.ground_truth_boxes(self.visual["ids"], self.visual["scales"])
    draw_detections(png_path, images, detections, self.class_names, truth)


class ConfiguredRetinaNet(RetinaNet):
  """RetinaNet holding the config's anchor, assigner and test settings, which the task's loss
  and eval outputs read from the model (a task holds no state). Same parameters as RetinaNet."""
  settings: RetinaNetSettings = RetinaNetSettings()


class DetectionTask(base.Task):
  name = "detection"
  best_metric = "AP"
  plot_metrics = ("AP", "AP50")

  def default_config(self, variant: str):
    return detection_configs.get_config(variant)

  def check_config(self, config) -> None:
    if config.max_boxes < 1:
      raise ConfigError(f"max_boxes={config.max_boxes} must be at least 1")
    if config.size_divisor < 1:
      raise ConfigError(f"size_divisor={config.size_divisor} must be at least 1")
    canvases = np.asarray(config.canvas_sizes).reshape(-1, 2) if len(config.canvas_sizes) else []
    if not len(canvases) or (canvases % config.size_divisor).any() or (canvases <= 0).any():
      raise ConfigError(f"canvas_sizes={tuple(map(tuple, canvases))} must be (h, w) pairs, "
                        f"positive multiples of size_divisor={config.size_divisor}")
    group = config.detection.images_per_group
    micro_batch = config.batch_size // config.grad_accum_steps
    if group < 0 or (group and micro_batch % group):
      raise ConfigError(f"detection.images_per_group={group} must divide the (micro-)batch of "
                        f"{micro_batch} images (0: the whole batch)")
    if not 0 <= config.aug.hflip <= 1:
      raise ConfigError(f"aug.hflip={config.aug.hflip} must be a probability")

  def dataset_info(self, config) -> base.DatasetInfo:
    info = detection_data.dataset_info(config)
    return base.DatasetInfo(
        name=info.name, num_classes=info.num_classes, class_names=info.class_names,
        num_train_examples=info.num_train_images, num_eval_examples=info.num_eval_images,
        train_split=info.train_split, eval_split=info.eval_split,
        steps_per_epoch=info.steps_per_epoch)

  def create_model(self, config, num_classes: int):
    return ConfiguredRetinaNet(config.variant, num_classes,
                               drop_path_rate=config.drop_path_rate, dtype=DTYPES[config.dtype],
                               settings=RetinaNetSettings.from_config(config))

  def init_variables(self, model, config, rng) -> dict:
    height, width = np.asarray(config.canvas_sizes).reshape(-1, 2)[0]
    return {"params": model.init(rng, jnp.zeros((1, int(height), int(width), 3)))["params"]}

  def load_init(self, config, variables: dict, shardings: dict) -> tuple[dict, str]:
    """A converted detector of the same classes (pvt_jax.convert of an mmdet checkpoint) fills
    the whole model; any other converted checkpoint (ImageNet, another detector) the backbone,
    the FPN and head keeping their mmdet initialisation."""
    checkpoint = load_converted(config.init_from)
    params = variables["params"]
    shapes = jax.tree.map(np.shape, params)
    if checkpoint.task == "detection" and jax.tree.map(np.shape, checkpoint.params) == shapes:
      loaded, what = checkpoint.params, "the whole detector"
    else:
      try:
        loaded = with_backbone(jax.device_get(params), checkpoint, config.variant)
      except CheckpointError as error:
        raise ConfigError(f"init_from {config.init_from}: {error}") from None
      what = f"the backbone of a {checkpoint.task} checkpoint"
    return {**variables, "params": sharding.to_global(loaded, shardings["params"])}, what

  def train_iterator(self, config, start_step: int):
    return detection_data.train_iterator(config, start_step)

  def eval_iterator(self, config):
    return detection_data.eval_iterator(config)

  def loss(self, model, variables: dict, batch: dict, rng) -> tuple:
    cls_maps, box_maps = model.apply(variables, batch["image"], train=True,
                                     rngs={"dropout": rng})
    loss, metrics = anchor_head.loss(cls_maps, box_maps, batch, model.settings)
    return loss, metrics, {}

  def eval_outputs(self, model, variables: dict, batch: dict) -> dict:
    cls_maps, box_maps = model.apply(variables, batch["image"])
    detections = anchor_head.predict(cls_maps, box_maps, batch["image_size"], model.settings)
    return {**detections, **{name: batch[name] for name in _PASSED_THROUGH}}

  def eval_accumulator(self, config, info) -> DetectionAccumulator:
    del info
    return DetectionAccumulator(config, detection_data.open_split(config, config.eval_split))

  def describe_eval(self, result: dict) -> str:
    return (", ".join(f"{name} {result[name]:.4f}" for name in METRICS)
            + f" over {result['num_images']} images ({result['num_detections']} detections)")
