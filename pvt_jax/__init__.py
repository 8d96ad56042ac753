"""pvt_jax: PVT v2 in JAX/Flax, numerically identical to the official PyTorch model."""

from pvt_jax.checkpoints import load_pretrained
from pvt_jax.models import VARIANTS, create_model

__version__ = "0.1.0"

__all__ = ["VARIANTS", "__version__", "create_model", "load_pretrained"]
