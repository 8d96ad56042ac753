"""Config files: the official recipe per variant, the quick default, modes and fine-tuning."""

import importlib

import pytest

from configs import finetune
from pvt_jax.configs import classification

VARIANTS = ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")


def load(variant, arg=None):
  return importlib.import_module(f"configs.{variant}").get_config(arg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_imagenet_mode_is_the_official_recipe(variant):
  c = load(variant, "imagenet")
  heavy = variant in ("b3", "b4", "b5")
  assert c.variant == variant
  assert c.drop_path_rate == (0.3 if heavy else 0.1)
  assert c.optimizer.grad_clip_norm == (1.0 if heavy else 0.0)
  assert (c.dataset, c.image_size, c.crop_pct, c.batch_size) == ("imagenet2012", 224, 0.875, 1024)
  assert (c.num_epochs, c.optimizer.warmup_epochs) == (300, 5.0)
  o = c.optimizer
  assert (o.b1, o.b2, o.eps, o.weight_decay) == (0.9, 0.999, 1e-8, 0.05)
  assert (o.warmup_lr, o.min_lr) == (1e-6, 1e-5)
  assert o.base_lr * c.batch_size / o.lr_batch_base == pytest.approx(1e-3)
  a = c.aug
  assert a.randaugment == "rand-m9-mstd0.5-inc1" and a.random_erasing == 0.25
  assert (a.mixup_alpha, a.cutmix_alpha, a.label_smoothing, a.repeated_aug) == (0.8, 1.0, 0.1, 3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_is_a_quick_offline_fashion_mnist_run(variant):
  c = load(variant)
  assert c.dataset == "fashion_mnist" and c.image_size <= 64
  assert c.aug.mixup_alpha == 0.0 and c.aug.randaugment == ""
  assert c.drop_path_rate == load(variant, "imagenet").drop_path_rate


def test_runlocal_shrinks_to_a_smoke_test():
  c = load("b0", "runlocal")
  assert c.num_train_steps > 0 and c.batch_size <= 16 and c.image_size == 32
  assert load("b2", "imagenet,runlocal").dataset == "imagenet2012"


def test_unknown_mode_is_named():
  with pytest.raises(ValueError, match="'fast'"):
    classification.get_config("b0", "imagenet,fast")


def test_finetune_config():
  c = finetune.get_config("b2,imagenet")
  assert c.variant == "b2" and c.reinit_head and c.init_from == ""
  assert c.optimizer.base_lr < load("b2", "imagenet").optimizer.base_lr
  assert finetune.get_config().variant == "b0"
  with pytest.raises(ValueError, match="'b9'"):
    finetune.get_config("b9")


def test_fields_the_data_module_reads_are_present():
  c = load("b0")
  for field in ("dataset", "data_dir", "manual_dir", "fashion_mnist_dir", "train_split",
                "eval_split", "image_size", "crop_pct", "batch_size", "eval_batch_size", "seed",
                "shuffle_buffer", "cache", "num_epochs", "num_train_steps", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "grad_accum_steps", "dtype"):
    assert field in c, field
  assert set(c.aug) == set(classification.imagenet_augmentation())
  assert set(c.mesh) == {"data", "fsdp"}
