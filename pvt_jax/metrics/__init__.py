"""Evaluation metrics of the dense tasks (pure JAX on device, finalised on the host)."""
