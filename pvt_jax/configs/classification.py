"""Image classification configs: the official ImageNet-1k recipe, a quick offline run, fine-tuning.

Modes (after the colon of a config file, comma-separated):

  (none)     quick offline run: Fashion-MNIST (local idx files) at 32 px with light augmentation,
             150 steps of 128 images; minutes on a CPU, and far above chance on the test split.
  imagenet   the official ImageNet-1k recipe (DeiT-style, `main.py` of the PVT repo): 224 px,
             global batch 1024, 300 epochs, RandAugment + mixup/cutmix + random erasing.
  runlocal   shrink whatever was chosen to a smoke test: 8 px batches, a handful of steps.

e.g. `--config=configs/b2.py:imagenet`, `--config=configs/b0.py:runlocal`. Any field can be
overridden from the command line (`--config.batch_size=256`); unknown fields are rejected.
"""

import ml_collections

from pvt_jax.configs import base

MODES = ("imagenet", "runlocal")


def imagenet_augmentation() -> ml_collections.ConfigDict:
  """The official training augmentation (timm `create_transform` + Mixup, repeated aug x3)."""
  return ml_collections.ConfigDict({
      "random_resized_crop": True, "crop_scale": (0.08, 1.0), "crop_ratio": (0.75, 1.3333333),
      "hflip": True, "randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
      "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
      "label_smoothing": 0.1, "repeated_aug": 3,
      # Examples mixed together: timm mixes each GPU's batch, 128 in the official 8 x 128.
      "mixup_batch": 128,
  })


def get_config(variant: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The classification config of `variant` in the modes named by `arg` (module docstring)."""
  _, modes = base.parse_arg(arg, MODES, variant=variant)
  c = base.base_config(variant)
  c.dataset = "imagenet2012"
  c.manual_dir = ml_collections.config_dict.placeholder(str)  # ImageNet's downloaded tars
  c.image_size = 224
  c.crop_pct = 0.875
  c.shuffle_buffer = 50_000
  c.cache = False
  c.aug = imagenet_augmentation()
  # A converted checkpoint's head is re-initialised when `reinit_head` is set or its class count
  # differs from num_classes.
  c.reinit_head = False
  if "imagenet" not in modes:
    _quick_fashion_mnist(c)
  if "runlocal" in modes:
    _runlocal(c)
  return c


def finetune_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Fine-tuning from a converted checkpoint: `arg` is the variant, then modes (`b2,imagenet`).

  The head is re-initialised for the dataset's classes; the rest starts from `init_from`, with a
  short schedule and a lower learning rate than training from scratch.
  """
  variant, modes = base.parse_arg(arg, MODES)
  c = get_config(variant, ",".join(sorted(modes)))
  c.init_from = ml_collections.config_dict.placeholder(str)  # None: required, set it
  c.reinit_head = True
  if "imagenet" in modes:
    c.num_epochs = 30
  c.optimizer.base_lr = 1e-3 if "imagenet" not in modes else 5e-5
  c.optimizer.warmup_epochs = 0.1 if "imagenet" not in modes else 1.0
  c.optimizer.min_lr = 1e-6
  return c


def _quick_fashion_mnist(c: ml_collections.ConfigDict) -> None:
  """Fashion-MNIST at 32 px, light augmentation, 150 steps of 128 images (a third of an epoch):
  a few minutes on a 2-core CPU, evaluated on the whole 10k test split every 50 steps."""
  c.dataset = "fashion_mnist"
  c.image_size = 32
  c.crop_pct = 1.0
  c.batch_size = 128
  c.num_train_steps = 150
  c.shuffle_buffer = 10_000
  c.cache = True
  c.aug.random_resized_crop = False
  c.aug.hflip = True
  c.aug.randaugment = ""
  c.aug.random_erasing = 0.0
  c.aug.mixup_alpha = 0.0
  c.aug.cutmix_alpha = 0.0
  c.aug.mixup_prob = 0.0
  c.aug.repeated_aug = 1
  c.optimizer.base_lr = 4e-3  # lr 1e-3 at batch 128: a short schedule needs no caution
  c.optimizer.warmup_epochs = 0.05
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 50


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """A smoke test of every code path: tiny batches, a few steps."""
  c.batch_size = 8
  c.image_size = 32
  c.num_train_steps = 10
  c.shuffle_buffer = 100
  c.cache = False
  c.log_every_steps = 2
  c.eval_every_steps = 5
  c.checkpoint_every_steps = 5
  c.optimizer.warmup_epochs = 0.0
