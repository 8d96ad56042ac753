"""The training loop of every task: check, init or resume, train with periodic eval and
checkpoints, stop cleanly. What differs between tasks comes from pvt_jax/tasks (base.py)."""

import dataclasses
import functools
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pvt_jax import tasks
from pvt_jax.models import create_model
from pvt_jax.train import (
  checkpointing,
  console,
  metrics,
  optimizer,
  sharding,
  steps,
  validation,
  workdir,
)
from pvt_jax.train.console import Progress, report
from pvt_jax.train.errors import ConfigError, NonFiniteLossError
from pvt_jax.train.validation import DTYPES

__all__ = ["DTYPES", "ConfigError", "Setup", "create_model_from_config", "create_setup",
           "evaluation_pass", "model_kwargs", "report", "train_and_evaluate"]


def model_kwargs(config) -> dict:
  """The PVT v2 settings every task's model takes from the config (`create_model` keywords)."""
  return {"drop_path_rate": config.drop_path_rate, "drop_rate": config.drop_rate,
          "attn_drop_rate": config.attn_drop_rate, "dtype": DTYPES[config.dtype],
          "remat_policy": config.remat_policy}


def create_model_from_config(config, num_classes: int):
  """The PVT v2 classifier of config.variant."""
  return create_model(config.variant, num_classes=num_classes, **model_kwargs(config))


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before any array is created."""
  task: tasks.Task
  info: tasks.DatasetInfo
  num_classes: int
  total_steps: int
  mesh: jax.sharding.Mesh
  model: object
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  init_fn: object  # () -> train state, a pure function to jit / eval_shape
  abstract_state: dict
  state_shardings: dict

  @property
  def steps_per_epoch(self) -> int:
    return self.info.steps_per_epoch


def _init_state(task, model, tx, config) -> dict:
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  variables = task.init_variables(model, config, init_rng)
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params), "rng": jax.random.key_data(train_rng),
          **{name: value for name, value in variables.items() if name != "params"}}


def create_setup(config, task: tasks.Task | None = None) -> Setup:
  """Opens the dataset (`task.dataset_info`) and builds model, optimizer and mesh."""
  task = task or validation.check_eval_config(config)
  info = task.dataset_info(config)
  num_classes = config.num_classes or info.num_classes
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(round(config.num_epochs * info.steps_per_epoch)))
  if total_steps <= 0:
    raise ConfigError(f"nothing to train: num_epochs={config.num_epochs} of "
                      f"{info.steps_per_epoch} steps rounds to 0 steps")
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  model = task.create_model(config, num_classes)
  schedule = optimizer.learning_rate_schedule(config, info.steps_per_epoch, total_steps)
  tx = optimizer.create_optimizer(config, schedule)
  init_fn = functools.partial(_init_state, task, model, tx, config)
  abstract_state = jax.eval_shape(init_fn)
  return Setup(task, info, num_classes, total_steps, mesh, model, schedule, tx, init_fn,
               abstract_state, sharding.state_shardings(abstract_state, mesh))


def evaluation_pass(setup: Setup, eval_step, variables, config) -> tasks.EvalAccumulator:
  """One pass over the whole eval split; the accumulator holds it (`.result()`)."""
  accumulator = setup.task.eval_accumulator(config, setup.info)
  pending = None  # one batch in flight: the host prepares the next while the devices compute
  for batch in setup.task.eval_iterator(config):
    outputs = eval_step(variables, sharding.global_batch(batch, setup.mesh))
    if pending is not None:
      accumulator.update(jax.device_get(pending[0]), pending[1])
    pending = (outputs, batch)
  if pending is not None:
    accumulator.update(jax.device_get(pending[0]), pending[1])
  return accumulator


class _StopRequest:
  """SIGTERM (preemption) or a first Ctrl-C: finish the current step, save a checkpoint, return
  normally. A second Ctrl-C raises KeyboardInterrupt (stop without saving).

  Single process: our own handlers. Multi-process: JAX's preemption sync manager (installed by
  jax.distributed.initialize), so that every process stops at the same step; Ctrl-C is passed to
  it as a SIGTERM.
  """

  def __init__(self, ckpts: checkpointing.TrainCheckpoints):
    self._ckpts = ckpts
    self.signal = None
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return
    if jax.process_count() == 1:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one aborts
      report("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, "
             "unsaved)")
      if jax.process_count() > 1:
        os.kill(os.getpid(), signal.SIGTERM)
    self.signal = self.signal or name

  def __call__(self, step: int) -> str | None:
    """The name of the signal that asks to stop at `step`, or None."""
    if jax.process_count() > 1:
      return (self.signal or "SIGTERM") if self._ckpts.reached_preemption(step) else None
    return self.signal

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class _Profiler:
  """A jax.profiler trace of config.profile_steps = (first, count): the steps from state step
  `first` to `first + count`, written into the workdir's TensorBoard directory."""

  def __init__(self, config, workdir_path: str):
    self.first, count = config.profile_steps
    self.last = self.first + count if count else None
    self.directory = os.path.join(workdir_path, metrics.TENSORBOARD_SUBDIR)
    self.active = False

  def before(self, step: int) -> None:
    if self.last is not None and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.last:
      self.stop(state)
      report(f"profile of steps {self.first + 1}-{self.last} written to {self.directory} "
             f"(TensorBoard's Profile tab)")

  def stop(self, state=None) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False


def _check_finite(state, ckpts: checkpointing.TrainCheckpoints, step: int) -> None:
  """A restored state must be finite: checkpoints written before the finiteness guard may not
  be."""
  if not bool(jax.jit(steps.all_finite)(state)):
    earlier = [s for s in ckpts.all_steps() if s < step]
    hint = (f"delete {os.path.join(ckpts.directory, str(step))} to resume from step "
            f"{max(earlier)}" if earlier else "start a new workdir")
    raise NonFiniteLossError(f"the checkpoint of step {step} holds non-finite values; {hint}")


def _last_eval(ckpts: checkpointing.TrainCheckpoints, step: int) -> dict | None:
  return ckpts.metrics(step) if step in ckpts.all_steps() else None


def train_and_evaluate(config, workdir_path: str) -> dict:
  """Trains `config` in `workdir_path`, resuming from its latest checkpoint if there is one.

  Order: the config (validation.check_config) and the workdir (workdir.check) are checked before
  the dataset is opened; config.json and dataset.json are written only after that.
  Returns {'step', 'eval' (last eval metrics or None), 'preempted' (the signal's name or None)}.
  """
  task = validation.check_config(config)
  notes = workdir.check(workdir_path, config)
  setup = create_setup(config, task)
  workdir.check_num_classes(workdir_path, setup.num_classes)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.write_records(workdir_path, config, setup.num_classes, setup.info.record())
  ckpts = checkpointing.TrainCheckpoints(workdir_path, task.best_metric,
                                         keep=config.keep_checkpoints)
  try:
    start = ckpts.latest_step() or 0
    for note in notes if start else ():
      report(f"note: {note}")
    if start >= setup.total_steps and not config.reevaluate:
      last = _last_eval(ckpts, start)
      report(f"{workdir_path}: training finished at step {start} (num_train_steps "
             f"{setup.total_steps}); nothing to do (--config.reevaluate=True evaluates again)")
      if last:
        report(f"step {start}: eval {task.describe_eval(last)}")
      return {"step": start, "eval": last, "preempted": None}
    console.start_summary(config, setup, workdir_path, start)
    if start:
      state = ckpts.restore(checkpointing.abstract_like(setup.abstract_state,
                                                        setup.state_shardings))
      _check_finite(state, ckpts, start)
    else:
      state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
      if config.init_from:
        variables, what = task.load_init(config, steps.model_variables(state),
                                         steps.model_variables(setup.state_shardings))
        state = {**state, **variables}
        report(f"initialised from {config.init_from} ({what})")
    eval_step = steps.make_eval_step(task, setup.model, setup.mesh,
                                     steps.model_variables(setup.state_shardings))
    if start >= setup.total_steps:  # reevaluate a finished run
      result = _evaluate_and_report(eval_step, state, config, setup, workdir_path)
      return {"step": start, "eval": result, "preempted": None}
    train_step = steps.make_train_step(task, config, setup.model, setup.tx, setup.schedule,
                                       setup.mesh, setup.state_shardings,
                                       config.grad_accum_steps)
    writer = metrics.MetricsWriter(workdir_path, start, enabled=is_main)
    if writer.dropped:
      report(f"dropped {writer.dropped} records after step {start} from "
             f"{metrics.METRICS_FILE} (logged before the run stopped; logged again now)")
    stop_requested = _StopRequest(ckpts)
    profiler = _Profiler(config, workdir_path)
    try:
      result = _run(config, setup, state, start, train_step, eval_step, ckpts, writer,
                    stop_requested, profiler, workdir_path)
    finally:
      profiler.stop()
      stop_requested.close()
      writer.close()
    ckpts.wait()
    if is_main:
      metrics.plot_metrics(writer.jsonl_path, os.path.join(workdir_path, metrics.PLOT_FILE),
                           task.plot_metrics)
    console.end_summary(ckpts, task.best_metric, workdir_path, result["step"])
    return result
  finally:
    ckpts.close()


def _evaluate_and_report(eval_step, state, config, setup, workdir_path) -> dict:
  accumulator = evaluation_pass(setup, eval_step, steps.model_variables(state), config)
  result = accumulator.result()
  step = int(state["step"])
  report(f"step {step}: eval {setup.task.describe_eval(result)}")
  if jax.process_index() == 0:
    accumulator.write_files(workdir_path, step)
  return result


class _Window:
  """The steps since the last log record: their losses and metrics, time and input wait."""

  def __init__(self):
    self.values: dict[str, list[float]] = {}
    self.steps = 0
    self.start = time.perf_counter()
    self.input_seconds = 0.0

  def add(self, values: dict) -> None:
    for name, value in values.items():
      self.values.setdefault(name, []).append(value)


def _run(config, setup, state, start, train_step, eval_step, ckpts, writer, stop_requested,
         profiler, workdir_path):
  total = setup.total_steps
  eval_every = config.eval_every_steps or setup.steps_per_epoch
  train_iter = setup.task.train_iterator(config, start)
  progress = Progress(total, start, config.progress_bar)
  window = _Window()
  last_eval, preempted = None, None
  last_only = ("lr", "grad_norm", "finite")  # logged for the last step, not averaged

  def check(step, step_metrics):
    """Host values of one step's metrics; stops the run on a non-finite loss or state, before
    that state can be saved."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
            and values["finite"]):
      ckpts.wait()
      last = ckpts.latest_step()
      kept = f"step {last}" if last is not None else "none"
      if math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]):
        what = (f"step {step} made the state non-finite (parameters, optimizer state or "
                f"collections; loss {values['loss']:.4g}, grad norm {values['grad_norm']:.4g}, "
                f"lr {values['lr']:.4g})")
      else:
        what = f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}"
      raise NonFiniteLossError(f"{what}; stopped, last good checkpoint: {kept}")
    window.add({k: v for k, v in values.items() if k not in last_only})
    return values

  # Each step's metrics are read one step late, so the host never waits for the step it just
  # queued; a step's state is saved only after its metrics said it is finite.
  pending = None
  step = start
  try:
    while step < total:
      profiler.before(step)
      waited = time.perf_counter()
      batch = sharding.global_batch(next(train_iter), setup.mesh)
      window.input_seconds += time.perf_counter() - waited
      state, step_metrics = train_step(state, batch)
      step += 1
      window.steps += 1
      progress.update()
      if step == total:
        progress.close()  # before the final eval, so the bar's time and rate are training only
      if pending is not None:
        check(*pending)
      pending = (step, step_metrics)
      ckpts.poll()
      profiler.after(step, state)
      preempted = stop_requested(step)
      log_now = step % config.log_every_steps == 0 or step == total or preempted
      eval_now = step % eval_every == 0 or step == total
      save_now = step % config.checkpoint_every_steps == 0 or step == total or preempted
      if not (log_now or eval_now or save_now):
        continue
      values = check(*pending)
      pending = None
      if log_now:
        _log(writer, progress, window, step, values, config.batch_size)
        window = _Window()
      if eval_now:
        eval_start = time.perf_counter()
        last_eval = _evaluate_and_report(eval_step, state, config, setup, workdir_path)
        writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
        window.start += time.perf_counter() - eval_start  # keep eval out of images/sec
      if save_now:
        ckpts.save(step, state, metrics.flatten(last_eval) if eval_now else None)
      if preempted:
        break
  finally:
    progress.close()
  return {"step": step, "eval": last_eval, "preempted": preempted}


def _log(writer, progress, window: _Window, step: int, values: dict, batch_size: int) -> None:
  """One train record: means over the window's steps (their number in train/window_steps, as a
  preempted run's last window and a resumed run's first are shorter), the last lr and grad norm,
  the rate, and the fraction of the time spent waiting for input."""
  elapsed = time.perf_counter() - window.start
  means = {f"train/{k}": float(np.mean(v)) for k, v in window.values.items()}
  scalars = {**means, "train/lr": values["lr"], "train/grad_norm": values["grad_norm"],
             "train/images_per_sec": window.steps * batch_size / elapsed,
             "train/input_wait": window.input_seconds / elapsed,
             "train/window_steps": window.steps}
  writer.write(step, scalars)
  progress.log(step, {"loss": f"{scalars['train/loss']:.4f}", "lr": f"{values['lr']:.2e}",
                      "img/s": f"{scalars['train/images_per_sec']:.0f}",
                      "input": console.fraction(scalars["train/input_wait"])})
