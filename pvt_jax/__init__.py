"""pvt_jax: PVT v2 in JAX/Flax, numerically identical to the official PyTorch model."""

import os

# Before jax (which sets it to 1) and TensorFlow read it: keep TF's C++ warnings off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ruff: noqa: E402  (the imports below must come after the environment is set)

from pvt_jax.checkpoints import load_pretrained
from pvt_jax.models import VARIANTS, create_model

__version__ = "0.1.0"

__all__ = ["VARIANTS", "__version__", "create_model", "load_pretrained"]
