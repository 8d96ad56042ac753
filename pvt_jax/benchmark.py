"""Speed, memory and FLOPs of pvt_jax against timm's PyTorch PVT v2, measured in one process.

  python -m pvt_jax.benchmark --variants=b0,b2 --output_dir=/tmp/bench

For each variant: inference and training-step images/s of pvt_jax (jit-compiled, warmed) and of
timm (eager; `--torch_compile` adds torch.compile), timed alternately repeat after repeat so that
both see the same machine load; compile times; peak memory; XLA's FLOP count against the paper's
and against the machine's measured matmul peak in the compute dtype. Then a resolution sweep
(inference time and memory against pixel count, with a linear fit) and the input pipeline's
images/s. Writes `results.json`, `results.md` (the README table, with the command that made it)
and, when there is a sweep, `benchmark.png` into --output_dir.

timm runs on the chip JAX runs on: the CPU, or a CUDA GPU (with autocast for bfloat16, timm's AMP).
"""

# ruff: noqa: E402  (run as a tool, re-exec under tcmalloc before the heavy imports)
from pvt_jax.cpu import allocator

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()

import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from pvt_jax import cpu, dense_report
from pvt_jax.cpu import kernels
from pvt_jax.cpu.compile_options import inference_compiler_options
from pvt_jax.models import V2_VARIANTS, VARIANTS, create_model, remat

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NUM_CLASSES = 1000


class BenchmarkError(Exception):
  """Bad benchmark settings, reported as one line."""


@dataclass(frozen=True)
class Settings:
  variants: tuple[str, ...]
  resolution: int
  batch_size: int
  dtype: str
  repeats: int
  torch_compile: bool
  sweep_variants: tuple[str, ...]
  sweep_resolutions: tuple[int, ...]
  sweep_batch_size: int
  sweep_repeats: int
  matmul_size: int
  input_batches: int
  fashion_mnist_dir: str
  remat_memory: bool = False


def check_settings(s: Settings) -> None:
  for v in s.variants + s.sweep_variants:
    if v not in VARIANTS:
      raise BenchmarkError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
  for r in (s.resolution,) + s.sweep_resolutions:
    if r < 32:
      raise BenchmarkError(f"resolution {r} is below PVT v2's minimum of 32 px")
  if min(s.batch_size, s.sweep_batch_size, s.repeats, s.sweep_repeats) < 1:
    raise BenchmarkError("batch sizes and repeats must be at least 1")
  if s.dtype not in DTYPES:
    raise BenchmarkError(f"unknown dtype {s.dtype!r}; choose from {', '.join(DTYPES)}")


def spread(seconds, images: int) -> dict:
  """Median, quartiles and extremes of repeated timings, as seconds and images/s."""
  t = np.asarray(seconds, np.float64)
  q1, med, q3 = np.percentile(t, [25, 50, 75])
  return {"seconds": t.tolist(), "median_s": med, "q1_s": q1, "q3_s": q3, "min_s": t.min(),
          "max_s": t.max(), "img_per_s": images / med, "img_per_s_iqr": [images / q3, images / q1]}


def time_interleaved(fns: dict, repeats: int) -> dict:
  """Seconds per call of every function, calling them in turn `repeats` times (after one warmup
  call each), so that slow phases of a shared machine hit all of them alike."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def torch_device() -> str:
  """Where timm runs: on the kind of chip JAX runs on, so that both are timed on the same one."""
  import torch
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu"
  if backend == "gpu" and torch.cuda.is_available():
    return "cuda"
  raise BenchmarkError(f"JAX runs on {backend} but PyTorch has no device there; timm must run "
                       "on the same kind of chip")


def _torch_sync(device: str) -> None:
  """Waits for queued CUDA work, which torch calls otherwise only launch."""
  if device == "cuda":
    import torch
    torch.cuda.synchronize()


def measure_matmul_peak(n: int, dtype: str = "float32", device: str = "cpu",
                        repeats: int = 5) -> dict:
  """FLOP/s of a big square matmul by each library here; the fastest is the machine's peak.

  XLA:CPU has two dot paths (YNNPACK for training, Eigen under `inference_compiler_options`) and
  PyTorch has its own BLAS, often faster: counting only XLA's would flatter pvt_jax.
  """
  import torch
  a = jax.random.normal(jax.random.key(1), (n, n), DTYPES[dtype])
  t = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
  t = t.to(device, getattr(torch, dtype))
  options = {"xla": {}, "xla_inference": inference_compiler_options()}
  if not options["xla_inference"]:  # GPU and TPU: the same product as "xla", timed once
    del options["xla_inference"]
  xla = {name: jax.jit(lambda a, b: a @ b, compiler_options=o).lower(a, a).compile()
         for name, o in options.items()}
  fns = {name: (lambda f=f: jax.block_until_ready(f(a, a))) for name, f in xla.items()}
  fns["torch"] = lambda: (torch.mm(t, t), _torch_sync(device))
  times = time_interleaved(fns, repeats)
  by_library = {name: 2 * n**3 / np.median(ts) / 1e9 for name, ts in times.items()}
  fastest = max(by_library, key=by_library.get)
  return {"n": n, "dtype": dtype, "device": device, "seconds": times,
          "gflops_per_s_by_library": by_library, "library": fastest,
          "gflops_per_s": by_library[fastest]}


def xla_memory(compiled) -> dict:
  """XLA's static buffer plan: peak = arguments + outputs + temporaries - donated aliases."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
          "peak_bytes": peak}


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of fn(*args) in the plain XLA forms of the ops (the program GPUs and TPUs
  run: an FFI call counts as no FLOPs), counted on the program as lowered, before any backend's
  passes. The compiled program's count would include XLA:CPU's rewrite of the depthwise conv's
  weight gradient (a convolution with batch_group_count=C, as `jax.grad` writes it; TPUs and
  cuDNN run it as is) into a dense C x C convolution whose diagonal it keeps: C times the work,
  which made B0's train step count 18x its inference. Traced through a new function object: jit
  would reuse an earlier trace of fn."""
  with cpu.disabled():
    cost = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


class JaxModel:
  """A compiled inference function and a compiled AdamW train step (params donated)."""

  def __init__(self, variant: str, batch: int, height: int, width: int, dtype: str,
               remat_policy: str = "none"):
    self.model = create_model(variant, NUM_CLASSES, dtype=DTYPES[dtype], remat_policy=remat_policy)
    rng = np.random.default_rng(0)
    self.images = jnp.asarray(rng.standard_normal((batch, height, width, 3), np.float32))
    self.labels = jax.nn.one_hot(rng.integers(0, NUM_CLASSES, batch), NUM_CLASSES)
    self.params = jax.jit(self.model.init)(jax.random.key(0), self.images[:1])["params"]
    self.tx = optax.adamw(1e-3, weight_decay=0.05)
    self.opt_state = self.tx.init(self.params)

  def compile_inference(self):
    start = time.perf_counter()
    compiled = jax.jit(self._logits, compiler_options=inference_compiler_options()).lower(
        self.params, self.images).compile()
    return compiled, time.perf_counter() - start

  def compile_train(self):
    start = time.perf_counter()
    compiled = jax.jit(self._train_step, donate_argnums=(0, 1)).lower(
        self.params, self.opt_state, self.images, self.labels).compile()
    return compiled, time.perf_counter() - start

  def _logits(self, params, images):
    return self.model.apply({"params": params}, images)

  def _loss(self, params, images, labels):
    return optax.softmax_cross_entropy(self._logits(params, images), labels).mean()

  def _train_step(self, params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(self._loss)(params, images, labels)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def flops(self):
    """XLA's FLOP counts of (the inference function, the train step)."""
    return (xla_flops(self._logits, self.params, self.images),
            xla_flops(self._train_step, self.params, self.opt_state, self.images, self.labels))

  def inference_fn(self, compiled):
    return lambda: jax.block_until_ready(compiled(self.params, self.images))

  def train_fn(self, compiled):
    def step():
      self.params, self.opt_state, loss = compiled(self.params, self.opt_state, self.images,
                                                   self.labels)
      jax.block_until_ready(loss)
    return step


class TorchModel:
  """timm's PVT v2 with the same batch (NCHW) and an AdamW step on soft-target cross-entropy."""

  def __init__(self, variant: str, batch: int, height: int, width: int, dtype: str,
               device: str = "cpu", compile_model: bool = False):
    import timm
    import torch
    self.torch = torch
    self.device = device
    torch.manual_seed(0)
    self.module = timm.create_model(f"pvt_v2_{variant}", num_classes=NUM_CLASSES).to(device)
    self.net = self.module
    if compile_model:
      self.net = torch.compile(self.module)
    rng = np.random.default_rng(0)
    self.images = torch.from_numpy(
        rng.standard_normal((batch, 3, height, width), np.float32)).to(device)
    self.labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch)).to(device)
    self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-3, weight_decay=0.05)
    self.autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16"
                     else contextlib.nullcontext())

  def infer(self):
    self.module.eval()
    with self.torch.inference_mode() if self.net is self.module else self.torch.no_grad():
      with self.autocast:
        self.net(self.images)
    _torch_sync(self.device)

  def train_step(self):
    self.module.train()
    self.opt.zero_grad(set_to_none=True)
    with self.autocast:
      loss = self.torch.nn.functional.cross_entropy(self.net(self.images), self.labels)
    loss.backward()
    self.opt.step()
    _torch_sync(self.device)


def _peak_rss_bytes() -> int:
  """This process's RSS high-water mark. Not ru_maxrss: Linux carries that over an exec from
  the parent, so a spawned child would inherit the benchmark's own peak."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _torch_peak_probe(variant, batch, height, width, dtype, device, queue):
  """In a fresh process: growth of peak memory over one inference, then over two train steps
  (host RSS on the CPU, the CUDA caching allocator's high-water mark on a GPU)."""
  import torch
  model = TorchModel(variant, batch, height, width, dtype, device)
  if device == "cuda":
    peak, measure = torch.cuda.max_memory_allocated, "torch.cuda.max_memory_allocated"
  else:
    peak, measure = _peak_rss_bytes, "peak RSS"
  base = peak()
  model.infer()
  after_infer = peak()
  model.train_step()
  model.train_step()
  queue.put({"inference_peak_growth_bytes": after_infer - base,
             "train_peak_growth_bytes": peak() - base, "measure": measure,
             "torch_threads": torch.get_num_threads()})


def torch_peak_memory(variant, batch, height, width, dtype, device) -> dict:
  """Peak-memory growth of timm, measured in a spawned process so JAX's buffers don't mask it."""
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_torch_peak_probe,
                     args=(variant, batch, height, width, dtype, device, queue))
  proc.start()
  try:
    result = queue.get(timeout=1800)
  finally:
    proc.join()
  return result


def compare_variant(variant: str, s: Settings, peak_flops: float, device: str) -> dict:
  """Interleaved pvt_jax vs timm timings for inference and one training step."""
  r, b = s.resolution, s.batch_size
  jx = JaxModel(variant, b, r, r, s.dtype)
  infer, infer_compile_s = jx.compile_inference()
  train, train_compile_s = jx.compile_train()
  flops_infer, flops_train = jx.flops()
  fns = {"jax_inference": jx.inference_fn(infer), "jax_train": jx.train_fn(train)}
  tm = TorchModel(variant, b, r, r, s.dtype, device)
  fns.update(torch_inference=tm.infer, torch_train=tm.train_step)
  result = {"variant": variant, "resolution": r, "batch_size": b, "dtype": s.dtype,
            "jax_compile_s": {"inference": infer_compile_s, "train": train_compile_s},
            "jax_memory": {"inference": xla_memory(infer), "train": xla_memory(train)}}
  if s.torch_compile:
    result["torch_compile"] = _try_torch_compile(variant, s, fns, device)
  times = time_interleaved(fns, s.repeats)
  result["timings"] = {name: spread(t, b) for name, t in times.items()}
  for mode in ("inference", "train"):
    jt, tt = np.asarray(times[f"jax_{mode}"]), np.asarray(times[f"torch_{mode}"])
    result[f"{mode}_speedup"] = {"ratio_of_medians": float(np.median(tt) / np.median(jt)),
                                 "per_repeat": (tt / jt).tolist()}
  # The official GMACs at 224x224 (the variant table); one multiply-add = 2 FLOPs.
  gflops_paper = 2 * VARIANTS[variant].official.gmacs * (r * r) / 224**2
  med_infer = result["timings"]["jax_inference"]["median_s"]
  med_train = result["timings"]["jax_train"]["median_s"]
  result["flops"] = {
      "xla_inference_gflops_per_image": flops_infer / b / 1e9,
      "xla_train_gflops_per_image": flops_train / b / 1e9,
      "paper_gflops_per_image": gflops_paper,
      "achieved_inference_gflops_per_s": flops_infer / med_infer / 1e9,
      "achieved_paper_gflops_per_s": gflops_paper * b / med_infer,
      "fraction_of_matmul_peak": flops_infer / med_infer / peak_flops,
      "achieved_train_gflops_per_s": flops_train / med_train / 1e9,
      "train_fraction_of_matmul_peak": flops_train / med_train / peak_flops,
      # The speed-up over timm that pvt_jax would reach if all its FLOPs ran at the matmul peak:
      # the ceiling for any implementation doing this arithmetic on this machine.
      "speedup_bound_at_matmul_peak": {
          mode: result["timings"][f"torch_{mode}"]["median_s"] / (flops / peak_flops)
          for mode, flops in (("inference", flops_infer), ("train", flops_train))},
  }
  result["torch_memory"] = torch_peak_memory(variant, b, r, r, s.dtype, device)
  return result


def _try_torch_compile(variant: str, s: Settings, fns: dict, device: str) -> dict:
  """torch.compile'd timm: adds it to `fns` when compiling works, else records why not."""
  r, b = s.resolution, s.batch_size
  try:
    tc = TorchModel(variant, b, r, r, s.dtype, device, compile_model=True)
    start = time.perf_counter()
    tc.infer()
    infer_s = time.perf_counter() - start
    start = time.perf_counter()
    tc.train_step()
    train_s = time.perf_counter() - start
  except Exception as e:  # noqa: BLE001 - any compiler failure is a result to report
    return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
  fns.update(torch_compiled_inference=tc.infer, torch_compiled_train=tc.train_step)
  return {"ok": True, "first_call_s": {"inference": infer_s, "train": train_s}}


def resolution_sweep(s: Settings) -> dict:
  """Inference time and XLA peak memory against pixel count, with least-squares line fits."""
  out = {}
  for variant in s.sweep_variants:
    rows = []
    for r in s.sweep_resolutions:
      jx = JaxModel(variant, s.sweep_batch_size, r, r, s.dtype)
      compiled, compile_s = jx.compile_inference()
      t = time_interleaved({"f": jx.inference_fn(compiled)}, s.sweep_repeats)["f"]
      rows.append({"resolution": r, "pixels": r * r, "median_s": float(np.median(t)),
                   "min_s": float(min(t)), "max_s": float(max(t)), "compile_s": compile_s,
                   "peak_bytes": xla_memory(compiled).get("peak_bytes"),
                   "gflops": xla_flops(jx._logits, jx.params, jx.images) / 1e9})
      del jx, compiled
    out[variant] = {"rows": rows, "time_fit": _line_fit(rows, "median_s"),
                    "memory_fit": _line_fit(rows, "peak_bytes"),
                    "flops_fit": _line_fit(rows, "gflops")}
  return out


# Train steps whose memory the issue tracker asked for: B5 at 224 px and B2 at 512 px.
REMAT_CASES = (("b5", 224), ("b2", 512))


def remat_memory(s: Settings) -> list:
  """Train-step memory with and without remat (`--remat_memory`): XLA's plan of the compiled
  step, the activations the forward keeps for the backward (`remat.residual_bytes`, what remat
  saves on GPU and TPU; XLA:CPU's compiled step undoes remat) and compile times."""
  rows = []
  for variant, r in REMAT_CASES:
    for policy in ("none", "full"):
      jx = JaxModel(variant, s.batch_size, r, r, s.dtype, remat_policy=policy)
      compiled, compile_s = jx.compile_train()
      rows.append({"variant": variant, "resolution": r, "batch_size": s.batch_size,
                   "remat_policy": policy, "train_compile_s": compile_s,
                   "xla_memory": xla_memory(compiled),
                   "residual_bytes": remat.residual_bytes(jx._loss, jx.params, jx.images,
                                                          jx.labels)})
      del jx, compiled
  return rows


def _line_fit(rows, key) -> dict:
  """y = a * pixels + b; r2 near 1 means linear growth, `per_pixel_growth` > 1 faster than it."""
  x = np.asarray([row["pixels"] for row in rows], np.float64)
  y = np.asarray([row[key] for row in rows], np.float64)
  if len(x) < 2:
    return {}
  slope, intercept = np.polyfit(x, y, 1)
  pred = slope * x + intercept
  ss_tot = float(((y - y.mean()) ** 2).sum())
  r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
  # Cost per pixel at the largest size over the cost per pixel at the smallest: ~1 when linear.
  growth = (y[-1] / x[-1]) / (y[0] / x[0])
  return {"slope": float(slope), "intercept": float(intercept), "r2": r2,
          "per_pixel_growth": float(growth)}


def input_pipeline(s: Settings) -> dict:
  """Images/s of pvt_jax.data's training pipeline with the official ImageNet augmentation, fed
  from the local Fashion-MNIST files (small PNG-free idx images, so decoding is cheap)."""
  try:
    from pvt_jax import data
    from pvt_jax.configs import classification
  except ImportError as e:
    return {"ok": False, "error": f"data pipeline unavailable: {e}"}
  if not hasattr(data, "measure_throughput"):
    return {"ok": False, "error": "pvt_jax.data.measure_throughput does not exist"}
  config = classification.get_config(s.variants[0], "imagenet")
  config.dataset = "fashion_mnist"
  config.fashion_mnist_dir = s.fashion_mnist_dir
  config.image_size = s.resolution
  config.batch_size = s.batch_size
  config.shuffle_buffer = 1000
  try:
    rate = data.measure_throughput(config, s.input_batches)
  except Exception as e:  # noqa: BLE001 - a failing pipeline is reported, not fatal
    return {"ok": False, "error": f"{type(e).__name__}: {e}"}
  return {"ok": True, "img_per_s": rate, "batches": s.input_batches,
          "dataset": "fashion_mnist (local idx files)", "augmentation": "imagenet recipe"}


def environment() -> dict:
  import timm
  import torch
  return {"python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
          "torch": torch.__version__, "timm": timm.__version__,
          "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "allocator": allocator.active_allocator(),
          "cpu_kernels": cpu.enabled() and kernels.available(),
          "machine": platform.processor() or platform.machine()}


def _mib(n):
  return f"{n / 2**20:,.0f}" if n is not None else "n/a"


def remat_markdown(rows) -> list:
  """The `--remat_memory` table's lines."""
  lines = ["", "Train step with and without remat (XLA:CPU's compiled step undoes remat; the kept "
           "activations are what it saves on GPU/TPU):", "",
           "| variant | px | batch | remat | XLA peak MiB | kept activations MiB | compile s |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['variant']} | {row['resolution']} | {row['batch_size']} "
                 f"| {row['remat_policy']} | {_mib(row['xla_memory'].get('peak_bytes'))} "
                 f"| {_mib(row['residual_bytes'])} | {row['train_compile_s']:.1f} |")
  return lines


def markdown(results: dict) -> str:
  """The README table: one row per variant, then the sweep and the context lines."""
  env, peak = results["environment"], results["matmul_peak"]
  lines = [
      f"Command: `{results['command']}`", "",
      f"Machine: {env['cpu_count']} CPU cores, JAX on {env['device_kind']}, timm on "
      f"{env['torch_device']}; load average at start {env['load_average'][0]:.1f}; "
      f"jax {env['jax']}, torch {env['torch']} ({env['torch_threads']} threads), timm "
      f"{env['timm']}; allocator (both): {env['allocator']}. Measured {peak['dtype']} matmul "
      f"peak ({peak['n']}x{peak['n']}, best of "
      + ", ".join(f"{k} {v:,.0f}" for k, v in peak["gflops_per_s_by_library"].items())
      + f"): {peak['gflops_per_s']:,.1f} GFLOP/s. pvt_jax inference is compiled with "
      "`pvt_jax.inference_compiler_options()`, its train step with XLA's defaults"
      + ("; C++ CPU kernels for the depthwise conv + GELU, the attention core, LayerNorm and"
         " narrow weight gradients."
         if env.get("cpu_kernels") else "."), "",
      "| variant | res | batch | dtype | inference img/s jax (IQR) | timm eager | speed-up "
      "| train img/s jax (IQR) | timm eager | speed-up | jax compile s (inf/train) "
      "| jax peak MiB (inf/train) | timm peak growth MiB (inf/train) "
      "| GFLOPs/img XLA (paper) | jax GFLOP/s, % of matmul peak (inf/train) "
      "| speed-up bound at matmul peak (inf/train) |",
      "|---" * 16 + "|",
  ]
  for r in results["variants"]:
    t, f = r["timings"], r["flops"]
    def rate(name, t=t):
      x = t[name]
      return f"{x['img_per_s']:.2f} ({x['img_per_s_iqr'][0]:.2f}-{x['img_per_s_iqr'][1]:.2f})"
    jm, tmem = r["jax_memory"], r["torch_memory"]
    lines.append(
        f"| {r['variant']} | {r['resolution']} | {r['batch_size']} | {r['dtype']} "
        f"| {rate('jax_inference')} | {t['torch_inference']['img_per_s']:.2f} "
        f"| {r['inference_speedup']['ratio_of_medians']:.2f}x "
        f"| {rate('jax_train')} | {t['torch_train']['img_per_s']:.2f} "
        f"| {r['train_speedup']['ratio_of_medians']:.2f}x "
        f"| {r['jax_compile_s']['inference']:.1f} / {r['jax_compile_s']['train']:.1f} "
        f"| {_mib(jm['inference'].get('peak_bytes'))} / {_mib(jm['train'].get('peak_bytes'))} "
        f"| {_mib(tmem['inference_peak_growth_bytes'])} / "
        f"{_mib(tmem['train_peak_growth_bytes'])} "
        f"| {f['xla_inference_gflops_per_image']:.2f} ({f['paper_gflops_per_image']:.2f}) "
        f"| {f['achieved_inference_gflops_per_s']:,.1f} ({100 * f['fraction_of_matmul_peak']:.0f}%)"
        f" / {f['achieved_train_gflops_per_s']:,.1f} "
        f"({100 * f['train_fraction_of_matmul_peak']:.0f}%) "
        f"| {f['speedup_bound_at_matmul_peak']['inference']:.2f}x / "
        f"{f['speedup_bound_at_matmul_peak']['train']:.2f}x |")
    tc = r.get("torch_compile")
    if tc and tc["ok"]:
      lines.append(f"|  |  |  | torch.compile | | {t['torch_compiled_inference']['img_per_s']:.2f} "
                   f"| | | {t['torch_compiled_train']['img_per_s']:.2f} | | "
                   f"first calls {tc['first_call_s']['inference']:.0f} / "
                   f"{tc['first_call_s']['train']:.0f} s | | | | | |")
    elif tc:
      lines.append(f"\ntorch.compile failed for {r['variant']}: {tc['error']}\n")
  if results.get("sweep"):
    lines += ["", "Resolution sweep (pvt_jax inference, batch "
              f"{results['settings']['sweep_batch_size']}): seconds / XLA peak MiB", "",
              "| variant | " + " | ".join(f"{row['resolution']}px" for row in
                                          next(iter(results["sweep"].values()))["rows"])
              + " | time vs pixels: R² of line, per-pixel growth |",
              "|---" * (2 + len(next(iter(results["sweep"].values()))["rows"])) + "|"]
    for v, sw in results["sweep"].items():
      cells = " | ".join(f"{row['median_s']:.2f} / {_mib(row['peak_bytes'])}" for row in sw["rows"])
      fit = sw["time_fit"]
      lines.append(f"| {v} | {cells} | R² {fit.get('r2', float('nan')):.3f}, "
                   f"{fit.get('per_pixel_growth', float('nan')):.2f}x |")
  ip = results.get("input_pipeline")
  if ip:
    lines += ["", (f"Input pipeline: {ip['img_per_s']:.1f} img/s ({ip['dataset']}, "
                   f"{ip['augmentation']} augmentation)") if ip["ok"]
              else f"Input pipeline: not measured ({ip['error']})"]
  if results.get("remat_memory"):
    lines += remat_markdown(results["remat_memory"])
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  """Time and memory against pixel count for every swept variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for v, sw in results["sweep"].items():
    px = np.asarray([row["pixels"] for row in sw["rows"]]) / 1e6
    ax_t.plot(px, [row["median_s"] for row in sw["rows"]], "o-", label=v)
    ax_m.plot(px, [row["peak_bytes"] / 2**20 for row in sw["rows"]], "o-", label=v)
  ax_t.set(xlabel="megapixels per image", ylabel="inference seconds per batch",
           title="time vs pixels")
  ax_m.set(xlabel="megapixels per image", ylabel="XLA peak MiB", title="memory vs pixels")
  for ax in (ax_t, ax_m):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(s: Settings, output_dir: str, command: str) -> dict:
  check_settings(s)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise BenchmarkError(f"cannot create output directory {output_dir}: {e.strerror}") from e
  device = torch_device()
  peak = measure_matmul_peak(s.matmul_size, s.dtype, device)
  results = {"command": command, "settings": s.__dict__,
             "environment": dict(environment(), torch_device=device), "matmul_peak": peak,
             "variants": []}
  for variant in s.variants:
    results["variants"].append(compare_variant(variant, s, peak["gflops_per_s"] * 1e9, device))
  results["sweep"] = resolution_sweep(s) if s.sweep_variants else {}
  results["input_pipeline"] = input_pipeline(s) if s.input_batches else None
  results["remat_memory"] = remat_memory(s) if s.remat_memory else []
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  table = markdown(results)
  with open(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(table)
  if results["sweep"]:
    plot(results, os.path.join(output_dir, "benchmark.png"))
  print(table)
  return results


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list("variants", ["b0", "b2"], "Variants compared with timm.")
  flags.DEFINE_integer("resolution", 224, "Square input size of the comparison.")
  flags.DEFINE_integer("batch_size", 16, "Batch size of the comparison.")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype (torch: autocast).")
  flags.DEFINE_integer("repeats", 7, "Timed repeats per measurement (after one warmup).")
  flags.DEFINE_bool("torch_compile", False, "Also time torch.compile'd timm (slow to compile).")
  flags.DEFINE_list("sweep_variants", ["b2", "b2_li"], "Variants of the resolution sweep.")
  flags.DEFINE_list("sweep_resolutions", ["224", "384", "512", "768", "1024"],
                    "Square sizes of the resolution sweep.")
  flags.DEFINE_integer("sweep_batch_size", 1, "Batch size of the resolution sweep.")
  flags.DEFINE_integer("sweep_repeats", 3, "Timed repeats per sweep point.")
  flags.DEFINE_integer("matmul_size", 4096, "Side of the square matmul that measures the peak.")
  flags.DEFINE_integer("input_batches", 20, "Batches timed of the input pipeline (0 skips).")
  flags.DEFINE_string("fashion_mnist_dir", "/usr/share/datasets/fashion-mnist",
                      "Fashion-MNIST idx files feeding the input-pipeline measurement.")
  flags.DEFINE_bool("quick", False, "Tiny settings for tests: b0, 32 px, batch 2, 2 repeats, "
                    "no input pipeline (with --pipeline: a 12-image folder at 64 px).")
  flags.DEFINE_bool("dense", False, "Instead: the Semantic FPN / RetinaNet parameter and GFLOPs "
                    "tables next to the paper's (pvt_jax/dense_report.py; --quick: B0, 64 px).")
  flags.DEFINE_bool("pipeline", False, "Instead of the models, time the input pipelines against "
                    "timm's DataLoader (pvt_jax/data/throughput.py): pipeline.md/.json.")
  flags.DEFINE_string("folder", None, "--pipeline: an ImageFolder root (train/<class>/*.jpg); "
                      "unset: ImageNet-sized JPEGs are made in output_dir.")
  flags.DEFINE_integer("pipeline_images", 1000, "--pipeline: JPEGs made when --folder is unset.")
  flags.DEFINE_bool("remat_memory", False, "Also compile the train steps of B5 at 224 px and "
                    "B2 at 512 px with and without remat: memory and compile time (slow).")
  flags.DEFINE_string("output_dir", None, "Where results.json/.md go, and benchmark.png "
                      "(the sweep's plot; none with --sweep_variants='').")
  flags.mark_flag_as_required("output_dir")


def settings_from_flags() -> Settings:
  try:
    sweep_resolutions = tuple(int(r) for r in FLAGS.sweep_resolutions)
  except ValueError as e:
    raise BenchmarkError(f"--sweep_resolutions must be integers: {e}") from e
  for name in FLAGS.variants:  # PVT v1 has no timm model to compare (python -m pvt_jax.ablation)
    if name not in V2_VARIANTS:
      what = "has no timm model" if name in VARIANTS else "unknown variant"
      raise BenchmarkError(f"{what} {name!r}; choose from {', '.join(V2_VARIANTS)}")
  s = Settings(tuple(FLAGS.variants), FLAGS.resolution, FLAGS.batch_size, FLAGS.dtype,
               FLAGS.repeats, FLAGS.torch_compile, tuple(FLAGS.sweep_variants), sweep_resolutions,
               FLAGS.sweep_batch_size, FLAGS.sweep_repeats, FLAGS.matmul_size, FLAGS.input_batches,
               FLAGS.fashion_mnist_dir, FLAGS.remat_memory)
  if FLAGS.quick:
    s = Settings(("b0",), 32, 2, FLAGS.dtype, 2, False, ("b0",), (32, 64), 1, 2, 256, 0,
                 FLAGS.fashion_mnist_dir)
  return s


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  command = "python -m pvt_jax.benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  # On a GPU both frameworks share the card: JAX allocates as it goes instead of taking 75% of it
  # (read when JAX first touches a device, which it has not yet).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if FLAGS.dense:
    dense_report.run(FLAGS.output_dir, FLAGS.quick)
    return
  if FLAGS.pipeline:
    import timm  # noqa: F401  (before TensorFlow, which pvt_jax.data loads: see throughput.py)

    from pvt_jax.data import DatasetError, throughput
    try:
      throughput.run(throughput.settings(FLAGS.quick, FLAGS.folder, FLAGS.pipeline_images),
                     FLAGS.output_dir, command)
    except DatasetError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  try:
    run(settings_from_flags(), FLAGS.output_dir, command)
  except BenchmarkError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
