"""Fields every task's config shares, and the `arg` string of config files.

A config file's `arg` is a comma-separated list: optionally a variant first (for files that serve
several, e.g. `configs/finetune.py:b2,imagenet`), then modes that the task defines. Each default
is set once, here or in the task's module; code reads config fields, never a fallback of its own.
"""

import ml_collections

from pvt_jax.models import VARIANTS


def parse_arg(arg: str | None, modes: tuple[str, ...], *, variant: str | None = None):
  """(variant, set of modes) from `arg`; `variant` is the file's own (else arg's first item)."""
  items = [m.strip() for m in (arg or "").split(",") if m.strip()]
  if variant is None:
    variant = items.pop(0) if items and items[0] not in modes else "b0"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
  unknown = sorted(set(items) - set(modes))
  if unknown:
    raise ValueError(f"unknown config mode {unknown[0]!r}; choose from {', '.join(modes)}")
  return variant, set(items)


def base_config(variant: str) -> ml_collections.ConfigDict:
  """What every task reads: model, global batch, optimizer, init, mesh and bookkeeping."""
  official = VARIANTS[variant].official
  c = ml_collections.ConfigDict()
  c.task = "classification"

  # Model.
  c.variant = variant
  c.num_classes = 0  # 0: the dataset's number of classes
  c.drop_path_rate = official.drop_path_rate
  c.drop_rate = 0.0
  c.attn_drop_rate = 0.0
  c.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision); params stay fp32
  # Gradient checkpointing per block (pvt_jax/models/remat.py): "none", "full", or a
  # jax.checkpoint_policies name such as "dots_with_no_batch_dims_saveable".
  c.remat_policy = "none"

  # Data: which dataset, and the batch over all devices and processes.
  c.dataset = ""
  c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data dir
  c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"
  c.train_split = "train"
  c.eval_split = ""  # "": "validation" if the dataset has one, else "test"
  c.check_data = True  # image folders: refuse empty class folders, unreadable files at start
  c.batch_size = 1024  # global, over all devices and processes
  c.eval_batch_size = 0  # 0: batch_size
  c.seed = 0

  # Optimisation (per optimizer step; one step = one global batch).
  c.num_epochs = 300
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.grad_accum_steps = 1  # micro-batches per step; the update equals the big-batch one
  c.optimizer = ml_collections.ConfigDict({
      "base_lr": 5e-4, "lr_batch_base": 512,  # lr = base_lr * batch_size / lr_batch_base
      # Learning-rate schedule, one of pvt_jax/train/optimizer.py's: "warmup_cosine" (reads
      # warmup_lr, warmup_epochs, min_lr), "poly" (poly_power, min_lr), "step" (warmup_steps,
      # warmup_ratio, decay_epochs, decay_rate); a task's config adds its schedule's fields.
      "schedule": "warmup_cosine",
      "warmup_lr": 1e-6, "min_lr": 1e-5, "warmup_epochs": 5.0,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.05,
      "decay_all_params": False,  # False: biases and norm parameters have no weight decay
      "grad_clip_norm": official.grad_clip_norm,  # 0: no clipping
  })

  # Initialisation from a converted checkpoint directory (pvt_jax.convert); "": from scratch.
  # Used when a run starts, ignored when it resumes.
  c.init_from = ""

  # Parallelism: a ('data', 'fsdp') mesh over all devices; data=-1 takes what fsdp leaves.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  # Bookkeeping.
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: once per epoch (and always at the end)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # latest K, plus the best by the task's eval metric
  c.progress_bar = True  # a live bar on a terminal; a line per log step when not on one
  # A finished run started again reports its last evaluation; True evaluates it again.
  c.reevaluate = False
  # (first step, number of steps) traced by jax.profiler into <workdir>/tensorboard (its
  # Profile tab); (0, 0): no trace. Steps count from 0, the first step of a run.
  c.profile_steps = (0, 0)
  return c
