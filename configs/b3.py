"""PVT v2 b3: see configs/common.py for the modes (`:imagenet` is the official recipe)."""

from configs import common


def get_config(arg=None):
  return common.get_config("b3", arg)
