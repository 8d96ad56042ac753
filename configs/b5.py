"""PVT v2 b5: see configs/common.py for the modes (`:imagenet` is the official recipe)."""

from configs import common


def get_config(arg=None):
  return common.get_config("b5", arg)
