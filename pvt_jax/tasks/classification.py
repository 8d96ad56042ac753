"""Image classification: PVT v2 with its linear head, soft-target cross-entropy, exact top-1/top-5.

Data come from pvt_jax/data (tf.data over tfds, image folders, the offline Fashion-MNIST) as
uint8 images with integer labels (eval batches also a mask); normalisation, random erasing and
mixup/cutmix with label smoothing run in the jitted train step (`augment_batch`,
pvt_jax/data/batch_augment.py). Checkpoints are ranked by top-1.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pvt_jax import data
from pvt_jax.checkpoints import load_converted, replace_head
from pvt_jax.configs import classification as classification_configs
from pvt_jax.data import batch_augment, sources
from pvt_jax.tasks import base
from pvt_jax.train import loop, sharding
from pvt_jax.train.errors import ConfigError

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what tfds.ImageFolder reads


def soft_cross_entropy(logits, soft_labels):
  """Per-example cross-entropy against soft targets (mixup / label smoothing)."""
  return -jnp.sum(soft_labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def _folder_class_counts(root: str, split: str, class_names) -> tuple[int, ...]:
  """Images per class of an image folder's split, from the directory listing (nothing read)."""
  directory = os.path.join(root, split)
  if not os.path.isdir(directory):  # e.g. a sliced split "train[:80%]"
    return ()
  return tuple(sum(name.lower().endswith(_IMAGE_SUFFIXES)
                   for name in os.listdir(os.path.join(directory, class_name)))
               if os.path.isdir(os.path.join(directory, class_name)) else 0
               for class_name in class_names)


class ClassificationAccumulator(base.SumAccumulator):
  """Masked top-1 / top-5 hits, loss and example count, summed over the eval batches."""

  def result(self) -> dict:
    totals = {k: v.item() for k, v in self.totals.items()}
    count = totals["count"]
    return {"top1": totals["correct_top1"] / count, "top5": totals["correct_top5"] / count,
            "loss": totals["loss_sum"] / count, "count": count}


class ClassificationTask(base.Task):
  name = "classification"
  best_metric = "top1"
  plot_metrics = ("top1", "top5")

  def default_config(self, variant: str):
    return classification_configs.get_config(variant)

  def check_config(self, config) -> None:
    if config.image_size <= 0:
      raise ConfigError(f"image_size={config.image_size} must be positive")
    if not 0 < config.crop_pct <= 1:
      raise ConfigError(f"crop_pct={config.crop_pct} must be in (0, 1]")
    if not 0 <= config.aug.label_smoothing < 1:
      raise ConfigError(f"aug.label_smoothing={config.aug.label_smoothing} must be in [0, 1)")
    if config.aug.repeated_aug < 1:
      raise ConfigError(f"aug.repeated_aug={config.aug.repeated_aug} must be at least 1")
    group = config.aug.mixup_batch
    if group <= 0 or (group < config.batch_size and config.batch_size % group):
      raise ConfigError(f"aug.mixup_batch={group} must be a positive divisor of batch_size="
                        f"{config.batch_size} (or at least it)")

  def dataset_info(self, config) -> base.DatasetInfo:
    info = data.dataset_info(config)
    # The data package's DatasetInfo has no class names yet: read them from the source's
    # ClassLabel feature (every classification source has one).
    source = sources.open_source(config)
    class_names = tuple(source.builder.info.features[source.label_key].names)
    counts = ((), ())
    if config.dataset.startswith(sources.FOLDER_PREFIX):
      root = config.dataset[len(sources.FOLDER_PREFIX):]
      counts = tuple(_folder_class_counts(root, split, class_names)
                     for split in (info.train_split, info.eval_split))
    return base.DatasetInfo(
        name=info.name, num_classes=info.num_classes, class_names=class_names,
        num_train_examples=info.num_train_examples, num_eval_examples=info.num_eval_examples,
        train_split=info.train_split, eval_split=info.eval_split,
        steps_per_epoch=max(info.num_train_examples // config.batch_size, 1),
        train_class_counts=counts[0], eval_class_counts=counts[1])

  def create_model(self, config, num_classes: int):
    return loop.create_model_from_config(config, num_classes)

  def init_variables(self, model, config, rng) -> dict:
    size = config.image_size
    return {"params": model.init(rng, jnp.zeros((1, size, size, 3)))["params"]}

  def load_init(self, config, variables: dict, shardings: dict) -> tuple[dict, str]:
    """Everything but (usually) the head from the converted checkpoint `init_from`; its head is
    kept when it has the dataset's classes and reinit_head is off, else the model's own."""
    checkpoint = load_converted(config.init_from)
    variant = checkpoint.metadata["variant"]
    if variant != config.variant:
      raise ConfigError(f"init_from {config.init_from} holds a {variant} checkpoint but "
                        f"config.variant is {config.variant}")
    params = variables["params"]
    loaded = replace_head(checkpoint.params, int(params["head"]["bias"].shape[0]),
                          keep=not config.reinit_head, new_head=params["head"])
    if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, params):
      raise ConfigError(f"init_from {config.init_from} does not match the {config.variant} "
                        f"parameter tree")
    kept = loaded["head"] is not params["head"]
    return ({**variables, "params": sharding.to_global(loaded, shardings["params"])},
            "its head" if kept else "a new head")

  def train_iterator(self, config, start_step: int):
    return data.train_iterator(config, start_step)

  def eval_iterator(self, config):
    return data.eval_iterator(config)

  def augment_batch(self, config, batch: dict, rng) -> dict:
    """Normalisation, random erasing, then mixup/cutmix and label smoothing (timm's order)."""
    aug = config.aug
    k_erase, k_mix = jax.random.split(rng)
    images = batch_augment.normalize(batch["image"])
    if aug.random_erasing > 0:
      images = batch_augment.random_erasing(k_erase, images, aug.random_erasing)
    return batch_augment.mixup_cutmix(
        k_mix, images, batch["label"], mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
        prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, smoothing=aug.label_smoothing,
        group=aug.mixup_batch)

  def loss(self, model, variables: dict, batch: dict, rng) -> tuple:
    logits = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng})
    return batch_augment.soft_target_cross_entropy(logits, batch).mean(), {}, {}

  def eval_outputs(self, model, variables: dict, batch: dict) -> dict:
    logits = model.apply(variables, batch_augment.normalize(batch["image"])).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    hits = top_k == labels[:, None]
    one_hot = jax.nn.one_hot(labels, logits.shape[-1])
    return {
        "correct_top1": jnp.sum(hits[:, 0] & mask),
        "correct_top5": jnp.sum(hits.any(axis=-1) & mask),
        "loss_sum": jnp.sum(jnp.where(mask, soft_cross_entropy(logits, one_hot), 0.0)),
        "count": jnp.sum(mask),
    }

  def eval_accumulator(self, config, info) -> ClassificationAccumulator:
    del config, info
    return ClassificationAccumulator()

  def describe_eval(self, result: dict) -> str:
    return (f"top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}, "
            f"loss {result['loss']:.4f} over {result['count']} examples")
