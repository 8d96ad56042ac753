"""PVT v1 classification (`:tiny`, `:small`, `:medium`, `:large`, default small), then the modes
of pvt_jax/configs/classification.py, e.g. `--config=configs/pvt_v1.py:small,imagenet`: the
official recipe of configs/pvt/pvt_*.py (drop path 0.1 for Tiny/Small, 0.3 and gradient clipping
1.0 for Medium/Large; otherwise v2's DeiT recipe, as both share the official main.py)."""

from pvt_jax.configs import classification

SIZES = ("tiny", "small", "medium", "large")


def get_config(arg=None):
  size, _, modes = (arg or "").partition(",")
  if size in classification.MODES or not size:  # no size given: modes only
    size, modes = "small", arg
  if size not in SIZES:
    raise ValueError(f"unknown PVT v1 size {size!r}; choose from {', '.join(SIZES)}")
  return classification.get_config(f"v1_{size}", modes)
