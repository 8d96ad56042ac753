"""The one place where an op's form is chosen per backend.

Each op here is the plain one in `ops`, except where JAX runs on the CPU (and `pvt_jax.cpu` is
not `disabled()`): there it is the form of the same name in `pvt_jax.cpu.ops`, selected with
`lax.platform_dependent`. The choice is then made when the program is lowered, so a step lowered
or exported for GPU or TPU from a CPU host (`jax.export`) holds only the plain forms.
"""

import functools

from jax import lax

from pvt_jax import cpu
from pvt_jax.models import ops


def _per_backend(plain):
  @functools.wraps(plain)
  def op(*args, **static):
    if not cpu.enabled():
      return plain(*args, **static)
    from pvt_jax.cpu import ops as cpu_ops  # which builds on `ops`: imported when first needed
    cpu_form = getattr(cpu_ops, plain.__name__)
    return lax.platform_dependent(*args, cpu=functools.partial(cpu_form, **static),
                                  default=functools.partial(plain, **static))
  return op


conv2d = _per_backend(ops.conv2d)
dense = _per_backend(ops.dense)
conv_ffn_hidden = _per_backend(ops.conv_ffn_hidden)
attention = _per_backend(ops.attention)
layer_norm = _per_backend(ops.layer_norm)
