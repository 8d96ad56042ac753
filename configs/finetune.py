"""Fine-tuning from a converted checkpoint (`python -m pvt_jax.convert ...`) on a new dataset.

arg: the variant, optionally followed by modes of pvt_jax/configs/classification.py, e.g.
  --config=configs/finetune.py:b2 --config.init_from=/ckpt/pvt_v2_b2
  --config=configs/finetune.py:b0,imagenet --config.init_from=... --config.dataset=folder:/data
The classifier head is re-initialised for the dataset's classes; the rest starts from
`init_from`, with a short schedule and a lower learning rate than training from scratch.
"""

from pvt_jax.configs import classification


def get_config(arg=None):
  return classification.finetune_config(arg)
