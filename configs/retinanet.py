"""RetinaNet on PVT v2 (paper Table 3): `--config=configs/retinanet.py:<variant>[,modes]`, modes
in pvt_jax/configs/detection.py (`coco` for the official 1x recipe, `3x`, `runlocal`)."""

from pvt_jax.configs import detection


def get_config(arg=None):
  return detection.get_config(arg)
