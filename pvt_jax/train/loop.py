"""The training loop: init or resume, train with periodic eval and checkpoints, stop cleanly."""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

from pvt_jax import data
from pvt_jax.checkpoints import load_converted
from pvt_jax.models import create_model
from pvt_jax.train import checkpointing, metrics, optimizer, sharding, steps
from pvt_jax.train.errors import ConfigError, NonFiniteLossError

CONFIG_FILE = "config.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before any array is created."""
  num_classes: int
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh
  model: object
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  init_fn: object  # () -> train state, a pure function to jit / eval_shape
  abstract_state: dict
  state_shardings: dict


def _init_state(model, tx, image_size: int, seed: int) -> dict:
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  params = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(train_rng)}


def create_model_from_config(config, num_classes: int):
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype={config.dtype!r} is not one of {', '.join(DTYPES)}")
  return create_model(config.variant, num_classes=num_classes,
                      drop_path_rate=config.drop_path_rate, drop_rate=config.drop_rate,
                      attn_drop_rate=config.attn_drop_rate, dtype=DTYPES[config.dtype])


def create_setup(config) -> Setup:
  """Validates `config` against the dataset and devices and builds model, optimizer and mesh."""
  info = data.dataset_info(config)
  num_classes = config.num_classes or info.num_classes
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(round(config.num_epochs * steps_per_epoch)))
  if total_steps <= 0:
    raise ConfigError("nothing to train: set num_epochs or num_train_steps > 0")
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size or config.batch_size, "eval_batch_size")
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % (accum * jax.device_count()):
    raise ConfigError(f"batch_size={config.batch_size} does not split into grad_accum_steps="
                      f"{accum} micro-batches over {jax.device_count()} devices")
  model = create_model_from_config(config, num_classes)
  schedule = optimizer.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = optimizer.create_optimizer(config, schedule)
  init_fn = functools.partial(_init_state, model, tx, config.image_size, config.seed)
  abstract_state = jax.eval_shape(init_fn)
  return Setup(num_classes, steps_per_epoch, total_steps, mesh, model, schedule, tx, init_fn,
               abstract_state, sharding.state_shardings(abstract_state, mesh))


def global_array(x: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
  """A host array identical on every process -> a global array with the `target` sharding."""
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def load_init_params(config, params, params_shardings):
  """`params` with everything but (usually) the head taken from the converted `init_from`."""
  checkpoint = load_converted(config.init_from)
  variant = checkpoint.metadata["variant"]
  if variant != config.variant:
    raise ConfigError(f"init_from {config.init_from} holds a {variant} checkpoint but "
                      f"config.variant is {config.variant}")
  loaded = dict(checkpoint.params)
  stored_head = loaded.pop("head", None)
  keep_head = (not config.reinit_head and stored_head is not None and
               jax.tree.map(np.shape, stored_head) == jax.tree.map(np.shape, params["head"]))
  body = {name: value for name, value in params.items() if name != "head"}
  if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, body):
    raise ConfigError(f"init_from {config.init_from} does not match the {config.variant} "
                      f"parameter tree")
  new = {name: jax.tree.map(global_array, value, params_shardings[name])
         for name, value in loaded.items()}
  new["head"] = (jax.tree.map(global_array, stored_head, params_shardings["head"]) if keep_head
                 else params["head"])
  report(f"initialised from {config.init_from} ({'its' if keep_head else 'a new'} head)")
  return new


def evaluate(eval_step, params, config, mesh) -> dict:
  """Exact top-1 / top-5 / loss over the whole eval split (padding masked out)."""
  sums = [eval_step(params, sharding.global_batch(batch, mesh))
          for batch in data.eval_iterator(config)]
  totals = {k: sum(np.asarray(s[k]).item() for s in jax.device_get(sums)) for k in sums[0]}
  count = totals["count"]
  return {"top1": totals["correct_top1"] / count, "top5": totals["correct_top5"] / count,
          "loss": totals["loss_sum"] / count, "count": count}


class _StopRequest:
  """SIGTERM (preemption): finish the current step, save a checkpoint, return normally.

  Single process: our own handler. Multi-process: JAX's preemption sync manager (installed by
  jax.distributed.initialize), so that every process stops at the same step.
  """

  def __init__(self, ckpts: checkpointing.TrainCheckpoints):
    self._ckpts = ckpts
    self._requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpts.reached_preemption(step)
    return self._requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def report(message: str) -> None:
  """A progress message on the console of the main process (beside the progress bar)."""
  logging.info(message)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _save_config(config, num_classes: int, workdir: str) -> None:
  resolved = config.copy_and_resolve_references()
  resolved.num_classes = num_classes
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(resolved.to_json_best_effort(indent=2))


def load_workdir_config(workdir: str) -> dict:
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return json.load(f)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns {'step', 'eval' (last eval metrics or None), 'preempted'}.
  """
  setup = create_setup(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    _save_config(config, setup.num_classes, workdir)
  ckpts = checkpointing.TrainCheckpoints(workdir, keep=config.keep_checkpoints)
  start = ckpts.latest_step()
  if start is not None:
    report(f"resuming from step {start}")
    state = ckpts.restore(checkpointing.abstract_like(setup.abstract_state, setup.state_shardings))
  else:
    start = 0
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
    if config.init_from:
      state["params"] = load_init_params(config, state["params"],
                                         setup.state_shardings["params"])
  train_step = steps.make_train_step(setup.model, setup.tx, setup.schedule, setup.mesh,
                                     setup.state_shardings, config.grad_accum_steps)
  eval_step = steps.make_eval_step(setup.model, setup.mesh, setup.state_shardings["params"])
  writer = metrics.MetricsWriter(workdir, enabled=is_main)
  stop_requested = _StopRequest(ckpts)
  try:
    result = _run(config, setup, state, start, train_step, eval_step, ckpts, writer,
                  stop_requested)
  finally:
    stop_requested.close()
    ckpts.wait()
    ckpts.close()
    writer.close()
  if is_main:
    metrics.plot_metrics(writer.jsonl_path, os.path.join(workdir, metrics.PLOT_FILE))
  return result


def _evaluate_and_report(eval_step, state, config, setup) -> dict:
  result = evaluate(eval_step, state["params"], config, setup.mesh)
  report(f"step {int(state['step'])}: eval top-1 {result['top1']:.4f}, "
         f"top-5 {result['top5']:.4f}, loss {result['loss']:.4f} over {result['count']} examples")
  return result


def _run(config, setup, state, start, train_step, eval_step, ckpts, writer, stop_requested):
  total = setup.total_steps
  eval_every = config.eval_every_steps or setup.steps_per_epoch
  train_iter = data.train_iterator(config, start)
  bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                  disable=not (config.progress_bar and jax.process_index() == 0))
  window = {"losses": [], "start": time.perf_counter(), "steps": 0}
  last_eval, last_eval_step, preempted = None, None, False

  def check(step, step_metrics):
    """Host values of one step's metrics; stops the run on a non-finite loss."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
      ckpts.wait()
      raise NonFiniteLossError(
          f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}; "
          f"stopped, last good checkpoint: step {ckpts.latest_step()}")
    window["losses"].append(values["loss"])
    return values

  # Each step's loss is read one step late, so the host never waits for the step it just queued.
  pending = None
  step = start
  while step < total:
    batch = sharding.global_batch(next(train_iter), setup.mesh)
    state, step_metrics = train_step(state, batch)
    step += 1
    window["steps"] += 1
    bar.update()
    if step == total:
      bar.close()  # before the final eval, so the bar's time and rate are training only
    if pending is not None:
      check(*pending)
    pending = (step, step_metrics)
    preempted = stop_requested(step)
    log_now = step % config.log_every_steps == 0 or step == total or preempted
    eval_now = step % eval_every == 0 or step == total
    save_now = step % config.checkpoint_every_steps == 0 or step == total or preempted
    if not (log_now or eval_now or save_now):
      continue
    values = check(*pending)
    pending = None
    if log_now:
      elapsed = time.perf_counter() - window["start"]
      scalars = {"train/loss": float(np.mean(window["losses"])), "train/lr": values["lr"],
                 "train/grad_norm": values["grad_norm"],
                 "train/images_per_sec": window["steps"] * config.batch_size / elapsed}
      writer.write(step, scalars)
      bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{values['lr']:.2e}",
                      img_s=f"{scalars['train/images_per_sec']:.0f}")
      window = {"losses": [], "start": time.perf_counter(), "steps": 0}
    if eval_now:
      eval_start = time.perf_counter()
      last_eval, last_eval_step = _evaluate_and_report(eval_step, state, config, setup), step
      writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
      window["start"] += time.perf_counter() - eval_start  # keep eval out of images/sec
    if save_now:
      ckpts.save(step, state, {"top1": last_eval["top1"]} if eval_now else None)
    if preempted:
      break
  bar.close()
  if step == total and last_eval_step != step:  # resumed from the final checkpoint
    last_eval = _evaluate_and_report(eval_step, state, config, setup)
  return {"step": step, "eval": last_eval, "preempted": preempted}
