"""Fine-tuning from a converted checkpoint (`python -m pvt_jax.convert ...`) on a new dataset.

arg: the variant, optionally followed by modes of configs/common.py, e.g.
  --config=configs/finetune.py:b2 --config.init_from=/ckpt/pvt_v2_b2
  --config=configs/finetune.py:b0,imagenet --config.init_from=... --config.dataset=folder:/data
The classifier head is re-initialised for the dataset's classes; the rest starts from
`init_from`, with a short schedule and a lower learning rate than training from scratch.
"""

from configs import common


def get_config(arg=None):
  variant, _, modes = (arg or "b0").partition(",")
  if variant not in common.RECIPE:
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(common.RECIPE)}")
  c = common.get_config(variant, modes)
  c.init_from = ""  # required: a converted checkpoint directory
  c.reinit_head = True
  if "imagenet" in modes:
    c.num_epochs = 30
  c.optimizer.base_lr = 1e-3 if "imagenet" not in modes else 5e-5
  c.optimizer.warmup_epochs = 0.1 if "imagenet" not in modes else 1.0
  c.optimizer.min_lr = 1e-6
  return c
