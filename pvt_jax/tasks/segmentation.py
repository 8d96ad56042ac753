"""Semantic segmentation: Semantic FPN on PVT v2 (paper Table 5), mmseg's loss, exact mIoU.

Data come from pvt_jax/data/segmentation (the official mmseg train pipeline; whole-image eval in
static-shape buckets padded with a mask). The model's BatchNorm is SyncBN: under the loop's jit
its statistics cover the whole data-parallel batch. Evaluation sums a confusion matrix on
device over the global batch (every device and host), so mIoU is exact over the split on any
number of processes; checkpoints are ranked by mIoU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pvt_jax.checkpoints import load_converted, with_backbone
from pvt_jax.configs import segmentation as segmentation_configs
from pvt_jax.data import segmentation as data
from pvt_jax.metrics import segmentation as metrics
from pvt_jax.models.semantic_fpn import (
  SemanticFPN,
  create_semantic_fpn,
  cross_entropy_loss,
  predict_labels,
)
from pvt_jax.tasks import base
from pvt_jax.train import loop, sharding
from pvt_jax.train.errors import ConfigError

# Eval outputs carry the predictions of each global batch's first rows for the overlay PNG (a
# fixed number, as shapes are static); rows 0.. are process 0's, which writes the PNG.
MAX_OVERLAY_IMAGES = 8
OVERLAY_FILE = "overlays_step_{step}.png"


class SegmentationAccumulator(base.EvalAccumulator):
  """The confusion matrix summed over the eval batches (`pixels`: how many it scored), the number
  of real images, and the first batch with real examples (with its predictions) for the overlay
  PNG."""

  def __init__(self, num_classes: int, class_names, num_overlay_images: int):
    self.confusion = metrics.ConfusionMatrix(num_classes, class_names)
    self.num_overlay_images = num_overlay_images
    self.overlay = None  # (host batch, predictions of its first rows)
    self.count = 0

  def update(self, outputs, batch: dict) -> None:
    self.confusion.update(outputs["confusion"])
    self.count += int(outputs["count"])
    if self.overlay is None and batch["mask"].any():
      self.overlay = (batch, outputs["overlay"])

  def result(self) -> dict:
    scores = self.confusion.result()
    return {"miou": scores["miou"], "macc": scores["macc"], "aacc": scores["aacc"],
            "iou": scores["iou"], "count": self.count, "pixels": int(self.confusion.total.sum())}

  def write_files(self, workdir: str, step: int) -> None:
    if self.overlay is None or not self.num_overlay_images:
      return
    batch, predictions = self.overlay
    rows = min(len(predictions), len(batch["mask"]))  # this process's rows among them
    metrics.save_overlays(
        os.path.join(workdir, OVERLAY_FILE.format(step=step)), batch["image"][:rows],
        batch["image_size"][:rows], batch["label"][:rows], batch["label_size"][:rows],
        predictions[:rows], batch["mask"][:rows], self.confusion.class_names,
        num_images=self.num_overlay_images)


class SegmentationTask(base.Task):
  name = "segmentation"
  best_metric = "miou"
  plot_metrics = ("miou", "macc", "aacc")

  def default_config(self, variant: str):
    return segmentation_configs.get_config(variant)

  def check_config(self, config) -> None:
    seg = config.seg
    if min(seg.crop_size) <= 0 or min(seg.scale) <= 0 or min(seg.eval_scale) <= 0:
      raise ConfigError(f"seg.crop_size={tuple(seg.crop_size)}, seg.scale={tuple(seg.scale)} and "
                        f"seg.eval_scale={tuple(seg.eval_scale)} must be positive")
    if not 0 < seg.ratio_range[0] <= seg.ratio_range[1]:
      raise ConfigError(f"seg.ratio_range={tuple(seg.ratio_range)} must be (low, high) with "
                        f"0 < low <= high")
    if not 0 <= seg.dropout_rate < 1:
      raise ConfigError(f"seg.dropout_rate={seg.dropout_rate} must be in [0, 1)")
    if not 0 < seg.cat_max_ratio <= 1:
      raise ConfigError(f"seg.cat_max_ratio={seg.cat_max_ratio} must be in (0, 1]")
    if seg.size_divisor <= 0 or seg.eval_canvas_multiple % seg.size_divisor:
      raise ConfigError(f"seg.eval_canvas_multiple={seg.eval_canvas_multiple} must be a multiple "
                        f"of seg.size_divisor={seg.size_divisor} (> 0)")
    if not 0 <= seg.num_overlay_images <= MAX_OVERLAY_IMAGES:
      raise ConfigError(f"seg.num_overlay_images={seg.num_overlay_images} must be in "
                        f"[0, {MAX_OVERLAY_IMAGES}]")

  def dataset_info(self, config) -> base.DatasetInfo:
    info = data.dataset_info(config)
    return base.DatasetInfo(
        name=info.name, num_classes=info.num_classes, class_names=info.class_names,
        num_train_examples=info.num_train_examples, num_eval_examples=info.num_eval_examples,
        train_split=info.train_split, eval_split=info.eval_split,
        steps_per_epoch=max(info.num_train_examples // config.batch_size, 1))

  def create_model(self, config, num_classes: int) -> SemanticFPN:
    kwargs = loop.model_kwargs(config)
    return create_semantic_fpn(config.variant, num_classes, dropout_rate=config.seg.dropout_rate,
                               drop_path_rate=kwargs["drop_path_rate"], dtype=kwargs["dtype"])

  def init_variables(self, model, config, rng) -> dict:
    return dict(model.init(rng, jnp.zeros((1, *config.seg.crop_size, 3))))

  def load_init(self, config, variables: dict, shardings: dict) -> tuple[dict, str]:
    """A converted Semantic FPN of the same classes: all of it (BN statistics too); otherwise
    (an ImageNet classifier, the paper's start, or a dense model of other classes) the
    backbone, with the model's own neck and head."""
    checkpoint = load_converted(config.init_from)
    if (checkpoint.task == self.name and checkpoint.metadata["variant"] == config.variant
        and jax.tree.map(np.shape, checkpoint.variables) == jax.tree.map(np.shape, variables)):
      return sharding.to_global(checkpoint.variables, shardings), "the whole Semantic FPN"
    loaded = with_backbone(variables["params"], checkpoint, config.variant)
    return ({**variables, "params": sharding.to_global(loaded, shardings["params"])},
            "its backbone; new neck and head")

  def train_iterator(self, config, start_step: int):
    return data.train_iterator(config, start_step)

  def eval_iterator(self, config):
    return data.eval_iterator(config)

  def loss(self, model, variables: dict, batch: dict, rng) -> tuple:
    logits, new_state = model.apply(variables, batch["image"], train=True,
                                    rngs={"dropout": rng}, mutable=["batch_stats"])
    loss = cross_entropy_loss(logits, batch["label"])
    return loss, {}, new_state

  def eval_outputs(self, model, variables: dict, batch: dict) -> dict:
    logits = model.apply(variables, batch["image"], method=SemanticFPN.decode)
    labels = batch["label"]
    predictions = predict_labels(logits, batch["image_size"], labels.shape[1:],
                                 batch["label_size"], model.align_corners)
    overlay = predictions[:MAX_OVERLAY_IMAGES]
    return {"confusion": metrics.confusion_matrix(labels, predictions, model.num_classes,
                                                  batch["mask"]),
            "count": jnp.sum(batch["mask"]),
            "overlay": overlay.astype(jnp.uint8) if model.num_classes <= 256 else overlay}

  def eval_accumulator(self, config, info) -> SegmentationAccumulator:
    num_classes = config.num_classes or info.num_classes
    names = list(info.class_names) if len(info.class_names) == num_classes else None
    return SegmentationAccumulator(num_classes, names, config.seg.num_overlay_images)

  def describe_eval(self, result: dict) -> str:
    return (f"mIoU {result['miou']:.4f}, mAcc {result['macc']:.4f}, aAcc {result['aacc']:.4f} "
            f"over {result['count']} images")
