"""pvt_jax: PVT v2 in JAX/Flax, numerically identical to the official PyTorch model."""

import importlib
import os

# Before jax (which sets it to 1) and TensorFlow read it: keep TF's C++ warnings off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# Imported on first use, so that the command-line tools can re-exec themselves
# (pvt_jax.cpu.allocator) before JAX and TensorFlow load.
_EXPORTS = {"VARIANTS": "pvt_jax.models", "create_model": "pvt_jax.models",
            "inference_compiler_options": "pvt_jax.cpu.compile_options",
            "load_pretrained": "pvt_jax.checkpoints"}

__all__ = ["VARIANTS", "__version__", "create_model", "inference_compiler_options",
           "load_pretrained"]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'pvt_jax' has no attribute {name!r}")
