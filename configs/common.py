"""Shared configuration for all PVT v2 variants (big_vision style `get_config(arg)`).

Each variant file calls `get_config(variant, arg)`. `arg` is a comma-separated list of modes:

  (none)     quick offline run: Fashion-MNIST (local idx files) at 32 px with light augmentation,
             150 steps of 128 images; minutes on a CPU, and far above chance on the test split.
  imagenet   the official ImageNet-1k recipe (DeiT-style, `main.py` of the PVT repo): 224 px,
             global batch 1024, 300 epochs, RandAugment + mixup/cutmix + random erasing.
  runlocal   shrink whatever was chosen to a smoke test: 8 px batches, a handful of steps.

e.g. `--config=configs/b2.py:imagenet`, `--config=configs/b0.py:runlocal`. Any field can be
overridden from the command line (`--config.batch_size=256`); unknown fields are rejected.
"""

import ml_collections

MODES = ("imagenet", "runlocal")

# Per variant: (drop_path_rate, grad_clip_norm) of the official recipe (0 = no clipping).
RECIPE = {
    "b0": (0.1, 0.0), "b1": (0.1, 0.0), "b2": (0.1, 0.0), "b2_li": (0.1, 0.0),
    "b3": (0.3, 1.0), "b4": (0.3, 1.0), "b5": (0.3, 1.0),
}


def parse_modes(arg: str | None) -> set[str]:
  modes = {m.strip() for m in (arg or "").split(",") if m.strip()}
  unknown = sorted(modes - set(MODES))
  if unknown:
    raise ValueError(f"unknown config mode {unknown[0]!r}; choose from {', '.join(MODES)}")
  return modes


def imagenet_augmentation() -> ml_collections.ConfigDict:
  """The official training augmentation (timm `create_transform` + Mixup, repeated aug x3)."""
  return ml_collections.ConfigDict({
      "random_resized_crop": True, "crop_scale": (0.08, 1.0), "crop_ratio": (0.75, 1.3333333),
      "hflip": True, "randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
      "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
      "label_smoothing": 0.1, "repeated_aug": 3,
  })


def get_config(variant: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `variant` in the modes named by `arg` (see the module docstring)."""
  modes = parse_modes(arg)
  drop_path_rate, grad_clip_norm = RECIPE[variant]
  c = ml_collections.ConfigDict()

  # Model.
  c.variant = variant
  c.num_classes = 0  # 0: the dataset's number of classes
  c.drop_path_rate = drop_path_rate
  c.drop_rate = 0.0
  c.attn_drop_rate = 0.0
  c.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision); params stay fp32

  # Data (read by pvt_jax.data).
  c.dataset = "imagenet2012"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.manual_dir = ml_collections.config_dict.placeholder(str)
  c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"
  c.train_split = "train"
  c.eval_split = ""  # "": "validation" if the dataset has one, else "test"
  c.image_size = 224
  c.crop_pct = 0.875
  c.batch_size = 1024  # global, over all devices and processes
  c.eval_batch_size = 0  # 0: batch_size
  c.seed = 0
  c.shuffle_buffer = 50_000
  c.cache = False
  c.aug = imagenet_augmentation()

  # Optimisation (per optimizer step; one step = one global batch).
  c.num_epochs = 300
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.grad_accum_steps = 1  # micro-batches per step; the update equals the big-batch one
  c.optimizer = ml_collections.ConfigDict({
      "base_lr": 5e-4, "lr_batch_base": 512,  # lr = base_lr * batch_size / lr_batch_base
      "warmup_lr": 1e-6, "min_lr": 1e-5, "warmup_epochs": 5.0,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.05,
      "grad_clip_norm": grad_clip_norm,  # 0: no clipping
  })

  # Fine-tuning: a converted checkpoint directory (pvt_jax.convert); its head is re-initialised
  # when `reinit_head` is set or its class count differs from num_classes.
  c.init_from = ""
  c.reinit_head = False

  # Parallelism: a ('data', 'fsdp') mesh over all devices; data=-1 takes what fsdp leaves.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  # Bookkeeping.
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: once per epoch (and always at the end)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # latest K, plus the best by eval top-1
  c.progress_bar = True

  if "imagenet" not in modes:
    _quick_fashion_mnist(c)
  if "runlocal" in modes:
    _runlocal(c)
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
