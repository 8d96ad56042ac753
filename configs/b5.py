"""PVT v2 b5 classification; modes in pvt_jax/configs/classification.py (`:imagenet`)."""

from pvt_jax.configs import classification


def get_config(arg=None):
  return classification.get_config("b5", arg)
