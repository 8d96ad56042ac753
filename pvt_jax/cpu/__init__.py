"""What pvt_jax does only for XLA:CPU, kept apart from the model.

GPU and TPU run PVT v2's ops in their plain XLA form (`pvt_jax.models.ops`). Where JAX runs on the
CPU, `pvt_jax.models.dispatch` (the one place that chooses) gives the same ops the forms in
`pvt_jax.cpu.ops`: C++ kernels (`kernels`, float32) and backward passes that XLA:CPU runs faster,
each with its measurement. Also here: `compile_options` (XLA:CPU options for inference) and
`allocator` (the command-line tools' tcmalloc re-exec).

Importing this package does not import JAX: the tools re-exec under tcmalloc before JAX loads.
"""

import contextlib

_disabled = 0


@contextlib.contextmanager
def disabled():
  """Within this context the model traces the plain XLA forms on the CPU too: the program GPUs and
  TPUs run, e.g. for XLA's FLOP count (which cannot see into an FFI call) or an A/B timing. It
  applies to what is traced here: jit reuses an earlier trace of the same function."""
  global _disabled
  _disabled += 1
  try:
    yield
  finally:
    _disabled -= 1


def enabled() -> bool:
  """Whether the model's ops take their CPU forms now: JAX's default backend is the CPU and
  `disabled()` is not in effect."""
  import jax
  return not _disabled and jax.default_backend() == "cpu"
