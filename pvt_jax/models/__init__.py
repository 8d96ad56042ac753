"""The PVT v2 network and its constructor."""

import jax.numpy as jnp

from pvt_jax.models import remat
from pvt_jax.models.pvt_v2 import VARIANTS, PyramidVisionTransformerV2, Variant


def create_model(variant: str, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 dtype=jnp.float32, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 remat_policy: str = "none") -> PyramidVisionTransformerV2:
  """A PVT v2 module by variant name (b0, b1, b2, b2_li, b3, b4, b5); params are always fp32.
  remat_policy: `pvt_jax.models.remat`'s name of what each block keeps for the backward pass."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown PVT v2 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  remat.check(remat_policy)
  return PyramidVisionTransformerV2(VARIANTS[variant], num_classes=num_classes,
                                    drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                    drop_path_rate=drop_path_rate, dtype=dtype,
                                    remat_policy=remat_policy)


__all__ = ["VARIANTS", "PyramidVisionTransformerV2", "Variant", "create_model"]
