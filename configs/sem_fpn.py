"""Semantic FPN on PVT v2 (paper Table 5): `configs/sem_fpn.py:<variant>[,modes]`, modes in
pvt_jax/configs/segmentation.py (none: offline quick run; `ade20k`: the paper's recipe;
`runlocal`), e.g. --config=configs/sem_fpn.py:b2,ade20k --config.init_from=ckpt/pvt_v2_b2."""

from pvt_jax.configs import base, segmentation


def get_config(arg=None):
  variant, modes = base.parse_arg(arg, segmentation.MODES)
  return segmentation.get_config(variant, ",".join(sorted(modes)))
