"""PVT v2 b1 classification; modes in pvt_jax/configs/classification.py (`:imagenet`)."""

from pvt_jax.configs import classification


def get_config(arg=None):
  return classification.get_config("b1", arg)
