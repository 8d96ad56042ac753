"""Device mesh and shardings: data parallelism on 'data', optional FSDP on 'fsdp'.

The global batch is split over every device (both axes); parameters and optimizer state are
replicated over 'data' and, when the 'fsdp' axis has more than one device, split along their largest
dimension that the axis size divides.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pvt_jax.train.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over all devices of all processes; data=-1 takes what fsdp leaves."""
  n = jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be a positive divisor of the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp_size: int) -> P:
  """Split the largest dimension that `fsdp_size` divides; replicate if none does."""
  if fsdp_size == 1 or not shape:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % fsdp_size == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def state_shardings(abstract_tree, mesh):
  """NamedShardings for a tree of (abstract) arrays: FSDP-split or replicated."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), fsdp_size)),
                      abstract_tree)


def check_batch_size(batch_size: int, what: str = "batch_size") -> None:
  """The global batch must be positive and split evenly over devices and processes."""
  n, procs = jax.device_count(), jax.process_count()
  if batch_size <= 0:
    raise ConfigError(f"{what}={batch_size} must be positive")
  if batch_size % n or batch_size % procs:
    raise ConfigError(f"global {what}={batch_size} is not divisible by the {n} devices")


def global_batch(local_batch: dict, mesh) -> dict:
  """This process's part of the batch -> global jax.Arrays split over the whole mesh."""
  sharding = batch_sharding(mesh)
  procs = jax.process_count()

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * procs,) + x.shape[1:])

  return jax.tree.map(put, local_batch)


def global_array(x: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
  """A host array identical on every process -> a global array with the `target` sharding."""
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def to_global(tree, shardings):
  """Host (numpy) leaves of `tree`, the same on every process, onto `shardings`; leaves that are
  jax.Arrays already stay as they are."""
  return jax.tree.map(
      lambda x, s: x if isinstance(x, jax.Array) else global_array(np.asarray(x), s),
      tree, shardings)
