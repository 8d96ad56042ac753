"""The PVT network (v2, and v1 as its Table 6 switches) and its constructor."""

import jax.numpy as jnp

from pvt_jax.models import remat
from pvt_jax.models.pvt_v2 import (
    V2_VARIANTS,
    VARIANTS,
    PyramidVisionTransformerV2,
    Variant,
)


def create_model(variant: str, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 dtype=jnp.float32, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 remat_policy: str = "none") -> PyramidVisionTransformerV2:
  """A PVT module by variant name (b0 ... b5, b2_li; v1_tiny ... v1_large; v1_small_ope);
  params are always fp32. remat_policy: `pvt_jax.models.remat`'s name of what each block keeps
  for the backward pass."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown PVT variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  remat.check(remat_policy)
  return PyramidVisionTransformerV2(VARIANTS[variant], num_classes=num_classes,
                                    drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                    drop_path_rate=drop_path_rate, dtype=dtype,
                                    remat_policy=remat_policy)


def model_name(variant: str) -> str:
  """The official name of a variant: pvt_v2_b2, pvt_v1_small (the v1 paper's PVT-Small)."""
  return f"pvt_{variant}" if variant.startswith("v1") else f"pvt_v2_{variant}"


__all__ = ["V2_VARIANTS", "VARIANTS", "PyramidVisionTransformerV2", "Variant", "create_model",
           "model_name"]
