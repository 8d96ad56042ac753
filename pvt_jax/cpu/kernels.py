"""Hand-written XLA:CPU kernels (C++, XLA FFI), compiled on first use and cached.

`csrc/` holds the parts of PVT v2 that XLA:CPU compiles poorly, forward and backward: the
FFN core GELU(depthwise 3x3 conv) with fc1's bias folded in (backward 4-15x faster than XLA's
form of the same sums), the attention core softmax(q k^T / sqrt(D)) v over few keys
(1.3-2.8x), LayerNorm (one pass each way) and the weight gradient x^T g of layers with a narrow
side (1.4-3x); see each file's header. They are built here rather than at install time so that
they always match the running jaxlib's FFI headers and the CPU they run on (`-march=native`),
and so that a missing compiler costs speed, not the install: `available()` is then False, with
one warning, and `pvt_jax.cpu.ops` uses XLA forms. Each call is declared to XLA's partitioner
(`custom_partitioning`), so sharded batches run per device.

Libraries are cached under $PVT_JAX_CACHE_DIR (default ~/.cache/pvt_jax), keyed by a hash of the
sources, the FFI headers, the compiler and this CPU, so changing any of them rebuilds.
PVT_JAX_CPU_KERNELS=0 turns the kernels off (A/B timing, debugging)."""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_SOURCES = pathlib.Path(__file__).parent / "csrc"
_TARGETS = {"pvt_depthwise_gelu": "PvtDepthwiseGeluForward",
            "pvt_depthwise_gelu_backward": "PvtDepthwiseGeluBackward",
            "pvt_attention": "PvtAttentionForward",
            "pvt_attention_backward": "PvtAttentionBackward",
            "pvt_layer_norm": "PvtLayerNormForward",
            "pvt_layer_norm_backward": "PvtLayerNormBackward",
            "pvt_weight_gradient": "PvtWeightGradient"}


def cache_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  return pathlib.Path(os.environ.get("PVT_JAX_CACHE_DIR", default / "pvt_jax"))


def _compiler_flags() -> list[str]:
  arch = "-mcpu=native" if platform.machine() in ("arm64", "aarch64") else "-march=native"
  return ["-O3", arch, "-std=c++20", "-fPIC", "-I", jax.ffi.include_dir()]


def _build(compiler: str, output: str) -> None:
  """Compiles every source to an object at once (most of each compile is parsing XLA's FFI
  headers, so this takes one file's time per core), then links them into `output`."""
  sources = sorted(_SOURCES.glob("*.cc"))
  with tempfile.TemporaryDirectory() as tmp:
    objects = [os.path.join(tmp, f"{source.stem}.o") for source in sources]
    jobs = [subprocess.Popen([compiler, *_compiler_flags(), "-c", str(source), "-o", obj],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for source, obj in zip(sources, objects, strict=True)]
    failed = [stderr for job in jobs for _, stderr in [job.communicate()] if job.returncode]
    if not failed:
      link = subprocess.run([compiler, "-shared", *objects, "-o", output], capture_output=True,
                            text=True)
      failed = [link.stderr] if link.returncode != 0 else []
  if failed:
    raise RuntimeError(f"{os.path.basename(compiler)} failed: {failed[0].strip()[-2000:]}")


def _cpu_identity() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(line for line in f if line.startswith(("model name", "flags")))
  except OSError:
    return platform.processor()


def library_path() -> pathlib.Path:
  """The compiled library for this source, jaxlib, compiler and CPU (built if missing)."""
  name = os.environ.get("CXX", "c++")
  compiler = shutil.which(name)
  if compiler is None:
    raise RuntimeError(f"no C++ compiler {name!r} on PATH (set CXX)")
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256()
  headers = sorted(pathlib.Path(jax.ffi.include_dir()).rglob("*.h"))
  for part in [*(p.read_bytes() for p in sorted(_SOURCES.glob("*.[ch]*"))),
               *(h.read_bytes() for h in headers),
               " ".join([name, *_compiler_flags()]).encode(), version.encode(),
               _cpu_identity().encode()]:
    key.update(part)
  path = cache_dir() / f"pvt_jax_cpu_kernels-{key.hexdigest()[:16]}.so"
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: concurrent processes never load a half file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      built = os.path.join(tmp, path.name)
      _build(compiler, built)
      os.replace(built, path)
  return path


@functools.cache
def available() -> bool:
  """Whether the kernels are built, loaded and registered with XLA:CPU (once per process)."""
  if os.environ.get("PVT_JAX_CPU_KERNELS") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(library_path()))
  except (OSError, RuntimeError) as e:
    warnings.warn(f"pvt_jax: CPU kernels unavailable ({e}); using XLA's formulation, slower "
                  "to train on CPU", RuntimeWarning, stacklevel=2)
    return False
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return True


def _require() -> None:
  if not available():
    raise RuntimeError("pvt_jax CPU kernels are unavailable (see the warning above)")


def _like(a):
  return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _depthwise_forward(x, taps, bias, input_bias):
  return jax.ffi.ffi_call("pvt_depthwise_gelu", _like(x), vmap_method="sequential")(
      x, taps, bias, input_bias)


def _depthwise_backward(x, taps, bias, input_bias, g):
  call = jax.ffi.ffi_call("pvt_depthwise_gelu_backward",
                          (_like(x), _like(taps), _like(bias), _like(input_bias)),
                          vmap_method="sequential")
  return tuple(call(x, taps, bias, input_bias, g))


# Sharding: XLA cannot see into an FFI call, so by itself it would gather a batch-sharded map
# onto every device and run the whole batch on each. These rules let it run per shard instead:
# batch and channels may stay sharded (channels carry their own taps and bias), rows and columns
# are gathered (the 3x3 stencil needs its neighbours), and the backward's kernel and bias
# gradients are summed over the devices that split the batch.


def _summed_across(entry, values):
  """Per-shard partial sums `values` added up over the mesh axes that one entry of a sharding
  spec names (the devices that split that dimension)."""
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return lax.psum(values, axes) if axes else values


def _spec4(arg):
  """The sharding spec of a rank-4 argument, one entry per dimension."""
  return tuple(arg.sharding.spec) + (None,) * (4 - len(arg.sharding.spec))


def _map_spec(arg):
  batch, _, _, channels = _spec4(arg)
  return batch, channels


def _specs(mesh, batch, channels):
  """Shardings of x, taps, bias and input_bias."""
  named = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
  return (named(batch, None, None, channels), named(None, None, channels), named(channels),
          named(channels))


def _partition_forward(mesh, arg_shapes, result_shape):
  specs = _specs(mesh, *_map_spec(arg_shapes[0]))
  return mesh, _depthwise_forward, specs[0], specs


def _partition_backward(mesh, arg_shapes, result_shape):
  batch, channels = _map_spec(arg_shapes[0])
  specs = _specs(mesh, batch, channels)

  def per_shard(x, taps, bias, input_bias, g):
    dx, *weight_grads = _depthwise_backward(x, taps, bias, input_bias, g)
    return dx, *_summed_across(batch, weight_grads)

  return mesh, per_shard, specs, (*specs, specs[0])


_partitioned_forward = custom_partitioning(_depthwise_forward)
_partitioned_forward.def_partition(
    _partition_forward, sharding_rule="b h w c, i j c, c, c -> b h w c",
    need_replication_factors=("h", "w", "i", "j"))
_partitioned_backward = custom_partitioning(_depthwise_backward)
_partitioned_backward.def_partition(
    _partition_backward,
    sharding_rule="b h w c, i j c, c, c, b h w c -> b h w c, i j c, c, c",
    need_replication_factors=("h", "w", "i", "j"))


def depthwise_gelu(x, taps, bias, input_bias):
  """GELU(depthwise 3x3 conv of (x [B, H, W, C] + input_bias [C]) with taps [3, 3, C], zero
  padding, + bias [C]); float32."""
  _require()
  return _partitioned_forward(x, taps, bias, input_bias)


def depthwise_gelu_backward(x, taps, bias, input_bias, g):
  """(dx, dtaps, dbias, dinput_bias) of `depthwise_gelu` for the output gradient g."""
  _require()
  return _partitioned_backward(x, taps, bias, input_bias, g)


def _attention_forward(q, kv):
  return jax.ffi.ffi_call("pvt_attention", _like(q), vmap_method="sequential")(q, kv)


def _attention_backward(q, kv, g):
  call = jax.ffi.ffi_call("pvt_attention_backward", (_like(q), _like(kv)),
                          vmap_method="sequential")
  return tuple(call(q, kv, g))


def _attention_specs(mesh, arg):
  """Images and heads may stay sharded (each is independent); queries, keys and channels not."""
  batch, _, heads, _ = _spec4(arg)
  return (NamedSharding(mesh, P(batch, None, heads, None)),
          NamedSharding(mesh, P(batch, None, None, heads, None)))


def _partition_attention(mesh, arg_shapes, result_shape):
  q_spec, kv_spec = _attention_specs(mesh, arg_shapes[0])
  return mesh, _attention_forward, q_spec, (q_spec, kv_spec)


def _partition_attention_backward(mesh, arg_shapes, result_shape):
  q_spec, kv_spec = _attention_specs(mesh, arg_shapes[0])
  return mesh, _attention_backward, (q_spec, kv_spec), (q_spec, kv_spec, q_spec)


_partitioned_attention = custom_partitioning(_attention_forward)
_partitioned_attention.def_partition(
    _partition_attention, sharding_rule="b n h d, b m two h d -> b n h d",
    need_replication_factors=("n", "d", "m", "two"))  # in the order they first appear
_partitioned_attention_backward = custom_partitioning(_attention_backward)
_partitioned_attention_backward.def_partition(
    _partition_attention_backward,
    sharding_rule="b n h d, b m two h d, b n h d -> b n h d, b m two h d",
    need_replication_factors=("n", "d", "m", "two"))  # in the order they first appear


def attention(q, kv):
  """softmax(q k^T / sqrt(D)) v per head: q [B, N, H, D], kv [B, M, 2, H, D]; float32, 16 | D."""
  _require()
  return _partitioned_attention(q, kv)


def attention_backward(q, kv, g):
  """(dq, dkv) of `attention` for the output gradient g."""
  _require()
  return _partitioned_attention_backward(q, kv, g)


def _layer_norm_forward(x, scale, bias, eps):
  return jax.ffi.ffi_call("pvt_layer_norm", _like(x), vmap_method="sequential")(
      x, scale, bias, eps=np.float32(eps))


def _layer_norm_backward(x, scale, g, eps):
  call = jax.ffi.ffi_call("pvt_layer_norm_backward", (_like(x), _like(scale), _like(scale)),
                          vmap_method="sequential")
  return tuple(call(x, scale, g, eps=np.float32(eps)))


def _row_specs(mesh, arg):
  """The row sharding of a [rows, C] argument, kept (rows are independent); columns and
  per-column vectors replicated."""
  rows = arg.sharding.spec[0] if len(arg.sharding.spec) else None
  return rows, NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P(None))


def _partition_layer_norm(eps, mesh, arg_shapes, result_shape):
  _, x_spec, vector_spec = _row_specs(mesh, arg_shapes[0])
  return (mesh, functools.partial(_layer_norm_forward, eps=eps), x_spec,
          (x_spec, vector_spec, vector_spec))


def _partition_layer_norm_backward(eps, mesh, arg_shapes, result_shape):
  rows, x_spec, vector_spec = _row_specs(mesh, arg_shapes[0])

  def per_shard(x, scale, g):
    dx, *weight_grads = _layer_norm_backward(x, scale, g, eps)
    return dx, *_summed_across(rows, weight_grads)

  return mesh, per_shard, (x_spec, vector_spec, vector_spec), (x_spec, vector_spec, x_spec)


_partitioned_layer_norm = custom_partitioning(_layer_norm_forward, static_argnums=(3,))
_partitioned_layer_norm.def_partition(
    _partition_layer_norm, sharding_rule="r c, c, c -> r c", need_replication_factors=("c",))
_partitioned_layer_norm_backward = custom_partitioning(_layer_norm_backward, static_argnums=(3,))
_partitioned_layer_norm_backward.def_partition(
    _partition_layer_norm_backward, sharding_rule="r c, c, r c -> r c, c, c",
    need_replication_factors=("c",))


def layer_norm(x, scale, bias, eps: float):
  """LayerNorm of each row of x [rows, C] (two-pass statistics), * scale [C] + bias [C]; float32."""
  _require()
  return _partitioned_layer_norm(x, scale, bias, eps)


def layer_norm_backward(x, scale, g, eps: float):
  """(dx, dscale, dbias) of `layer_norm` for the output gradient g."""
  _require()
  return _partitioned_layer_norm_backward(x, scale, g, eps)


def _weight_gradient(x, g):
  out = jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), x.dtype)
  return jax.ffi.ffi_call("pvt_weight_gradient", out, vmap_method="sequential")(x, g)


def _partition_weight_gradient(mesh, arg_shapes, result_shape):
  """Rows may stay sharded: each device sums its own, then the partial products are added."""
  rows, operand, _ = _row_specs(mesh, arg_shapes[0])

  def per_shard(x, g):
    return _summed_across(rows, _weight_gradient(x, g))

  return mesh, per_shard, NamedSharding(mesh, P(None, None)), (operand, operand)


_partitioned_weight_gradient = custom_partitioning(_weight_gradient)
_partitioned_weight_gradient.def_partition(
    _partition_weight_gradient, sharding_rule="m k, m n -> k n",
    need_replication_factors=("k", "n"))


def weight_gradient(x, g):
  """x^T g [K, N] for x [M, K] and g [M, N] (float32, N a multiple of 16): a dense layer's
  kernel gradient, summed over all rows."""
  _require()
  return _partitioned_weight_gradient(x, g)
