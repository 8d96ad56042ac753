"""The task-generic loop with a tiny test-only task whose model has BatchNorm: mutable
collections trained, threaded through gradient accumulation, saved and resumed exactly; Ctrl-C;
logs after a crash; a non-finite state never saved; a finished run not redone; per-example eval
outputs seen once; summaries, progress lines, input wait and a profiler trace.

Everything runs in this process on a model of a few hundred parameters (seconds, no PVT compile).
"""

import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pvt_jax import tasks
from pvt_jax.configs import base
from pvt_jax.train import checkpointing, errors, loop, metrics, steps

NUM_CLASSES, NUM_TRAIN, NUM_EVAL, SIZE = 3, 48, 10, 8


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = base.base_config("b0")
  c.task = "tiny_bn"
  c.batch_size = 8
  c.eval_batch_size = 4  # 10 eval examples: the last batch is padded
  c.num_train_steps = 6
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.progress_bar = False
  c.optimizer.base_lr = 0.01
  c.optimizer.lr_batch_base = 8
  c.optimizer.warmup_epochs = 0.0
  c.tiny = ml_collections.ConfigDict({"interrupt_at": -1, "poison_at": -1})
  c.update_from_flattened_dict(overrides)
  return c


def examples(indices):
  """Images whose class shifts one channel up, deterministic per index."""
  labels = np.asarray(indices) % NUM_CLASSES
  images = np.stack([np.random.default_rng(i).standard_normal((SIZE, SIZE, 3)) for i in indices])
  images[np.arange(len(labels)), :, :, labels] += 1.5
  return images.astype(np.float32), labels.astype(np.int32)


class TinyNet(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)  # BatchNorm follows: a bias would get no gradient
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(self.num_classes)(nn.relu(x).mean(axis=(1, 2)))


class OnceEach(tasks.EvalAccumulator):
  """Per-example rows (index, prediction) with the mask: each example must arrive once."""

  def __init__(self):
    self.rows = {}

  def update(self, outputs, batch):
    del batch
    for index, prediction, label in zip(outputs["index"][outputs["mask"]],
                                        outputs["prediction"][outputs["mask"]],
                                        outputs["label"][outputs["mask"]], strict=True):
      assert int(index) not in self.rows, f"example {index} arrived twice"
      self.rows[int(index)] = (int(prediction), int(label))

  def result(self):
    hits = [p == label for p, label in self.rows.values()]
    return {"accuracy": float(np.mean(hits)), "count": len(hits)}


class TinyBatchNormTask(tasks.Task):
  name = "tiny_bn"
  best_metric = "accuracy"
  plot_metrics = ("accuracy",)

  def default_config(self, variant):
    del variant
    return tiny_config()

  def dataset_info(self, config):
    return tasks.DatasetInfo("tiny", NUM_CLASSES, ("a", "b", "c"), NUM_TRAIN, NUM_EVAL,
                             "train", "eval", NUM_TRAIN // config.batch_size)

  def create_model(self, config, num_classes):
    return TinyNet(num_classes)

  def init_variables(self, model, config, rng):
    return dict(model.init(rng, jnp.zeros((1, SIZE, SIZE, 3))))

  def load_init(self, config, variables, shardings):
    raise NotImplementedError

  def train_iterator(self, config, start_step):
    """This process's rows of each global batch."""
    local = config.batch_size // jax.process_count()
    rows = jax.process_index() * local + np.arange(local)
    for step in itertools.count(start_step):
      if step == config.tiny.interrupt_at:  # as if Ctrl-C were pressed while it is read
        os.kill(os.getpid(), signal.SIGINT)
      images, labels = examples((step * config.batch_size + rows) % NUM_TRAIN)
      if step == config.tiny.poison_at:  # zero-mean, huge: BatchNorm's variance overflows
        images = np.random.default_rng(step).standard_normal(images.shape, np.float32) * 1e20
      yield {"image": images, "label": labels}

  def eval_iterator(self, config):
    """Examples dealt round robin to the processes, each padded to the same number of whole
    batches (as the real eval iterators do)."""
    count, local = jax.process_count(), config.eval_batch_size // jax.process_count()
    mine = np.arange(jax.process_index(), NUM_EVAL, count)
    padded = -(-len(np.arange(0, NUM_EVAL, count)) // local) * local
    for first in range(0, padded, local):
      chosen = mine[first:first + local]
      mask = np.arange(local) < len(chosen)
      index = np.pad(chosen, (0, local - len(chosen)))  # padding repeats example 0, masked
      images, labels = examples(index)
      yield {"image": images, "label": labels, "index": index, "mask": mask}

  def loss(self, model, variables, batch, rng):
    del rng
    logits, new_state = model.apply(variables, batch["image"], train=True,
                                    mutable=["batch_stats"])
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(log_probs, batch["label"][:, None], axis=1).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}, new_state

  def eval_outputs(self, model, variables, batch):
    logits = model.apply(variables, batch["image"])
    return {"index": batch["index"], "prediction": logits.argmax(-1), "label": batch["label"],
            "mask": batch["mask"]}

  def eval_accumulator(self, config, info):
    return OnceEach()

  def describe_eval(self, result):
    return f"accuracy {result['accuracy']:.4f} over {result['count']} examples"


@pytest.fixture(autouse=True)
def tiny_task(monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "tiny_bn", f"{__name__}:TinyBatchNormTask")


def train(config, workdir):
  """(result, console output) of a run in this process."""
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    result = loop.train_and_evaluate(config, str(workdir))
  return result, console.getvalue()


def final_state(workdir, config, step=None):
  setup = loop.create_setup(config)
  ckpts = checkpointing.TrainCheckpoints(str(workdir), "accuracy", read_only=True)
  state = ckpts.restore(checkpointing.abstract_like(setup.abstract_state, setup.state_shardings),
                        step)
  ckpts.close()
  return jax.device_get(state)


def records(workdir):
  return metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """6 uninterrupted steps, with a line progress (stdout is no terminal here) and a trace."""
  workdir = tmp_path_factory.mktemp("straight")
  config = tiny_config(progress_bar=True, profile_steps=(2, 2))
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(tasks.TASKS, "tiny_bn", f"{__name__}:TinyBatchNormTask")
    result, console = train(config, workdir)
  return config, workdir, result, console


def test_batch_stats_are_trained_saved_and_evaluated(straight):
  config, workdir, result, _ = straight
  state = final_state(workdir, config)
  assert set(state) == {"step", "params", "opt_state", "rng", "batch_stats"}
  stats = state["batch_stats"]["BatchNorm_0"]
  assert int(state["step"]) == 6 and not np.allclose(stats["mean"], 0)
  # Evaluation uses the running statistics: the accumulator saw each example once, and its
  # accuracy is the model's with the checkpoint's variables, computed here directly.
  images, labels = examples(np.arange(NUM_EVAL))
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  predictions = TinyNet(NUM_CLASSES).apply(variables, images).argmax(-1)
  assert result["eval"] == {"accuracy": float(np.mean(predictions == labels)), "count": NUM_EVAL}


def test_evaluation_restores_only_the_model_variables(straight):
  """What `evaluate` reads of a workdir: params and collections, not the optimizer state."""
  config, workdir, _, _ = straight
  setup = loop.create_setup(config)
  shardings = steps.model_variables(setup.state_shardings)
  abstract = checkpointing.abstract_like(steps.model_variables(setup.abstract_state), shardings)
  ckpts = checkpointing.TrainCheckpoints(str(workdir), "accuracy", read_only=True)
  part = jax.device_get(ckpts.restore_part(abstract, 6))
  ckpts.close()
  assert set(part) == {"params", "batch_stats"}
  full = final_state(workdir, config)
  jax.tree.map(np.testing.assert_array_equal, part, steps.model_variables(full))


def test_start_and_end_summaries_progress_lines_and_input_wait(straight):
  _, workdir, _, console = straight
  assert f"workdir   {workdir}: no checkpoint, starting from scratch" in console
  assert "task      tiny_bn" in console and "classes   a, b, c" in console
  assert "training  6 steps of 8 (8 per device): 1 epochs of 6 steps" in console
  lines = [line for line in console.splitlines() if line.startswith("step 3/6: loss ")]
  assert len(lines) == 1 and "input " in lines[0] and "left)" in lines[0]
  assert "\r" not in console
  best = checkpointing.TrainCheckpoints(str(workdir), "accuracy", read_only=True).best_step()
  (accuracy,) = [r["eval/accuracy"] for r in records(workdir)
                 if r["step"] == best and "eval/accuracy" in r]
  assert f"best: step {best} (accuracy {accuracy:.4f})" in console
  train_records = [r for r in records(workdir) if "train/loss" in r]
  assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
  assert all(0 <= r["train/input_wait"] < 1 and r["train/window_steps"] == 1
             for r in train_records)
  assert all("train/accuracy" in r for r in train_records)  # the task's loss metrics


def test_profile_steps_write_a_trace(straight):
  _, workdir, _, console = straight
  traces = [f for _, _, files in os.walk(os.path.join(workdir, metrics.TENSORBOARD_SUBDIR))
            for f in files if f.endswith(".xplane.pb")]
  assert traces and "profile of steps 3-4 written to" in console


def test_ctrl_c_saves_and_the_resumed_run_is_exact(straight, tmp_path):
  config, straight_dir, straight_result, _ = straight
  interrupted = tiny_config(**{"tiny.interrupt_at": 2})
  result, console = train(interrupted, tmp_path)
  assert result["preempted"] == "SIGINT" and result["step"] == 3
  assert "Ctrl-C: stopping after this step" in console
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
  resumed, console = train(interrupted, tmp_path)  # the iterator now starts after step 2
  assert f"workdir   {tmp_path}: resuming from step 3" in console
  jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path, config),
               final_state(straight_dir, config))  # batch_stats included
  assert resumed["eval"] == straight_result["eval"]
  steps_logged = [r["step"] for r in records(tmp_path) if "train/loss" in r]
  assert steps_logged == [1, 2, 3, 4, 5, 6]


def test_a_crash_after_the_last_checkpoint_logs_each_step_once(straight, tmp_path):
  """As after kill -9 at step 6 before its checkpoint: steps 4-6 were logged, only 3 saved."""
  config, straight_dir, _, _ = straight
  crashed = tmp_path / "crashed"
  shutil.copytree(straight_dir, crashed)
  shutil.rmtree(crashed / "checkpoints" / "6")
  with open(crashed / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 7, "train/lo')  # a record cut off by the kill
  _, console = train(tiny_config(), crashed)
  assert "dropped 5 records after step 3" in console  # 4, 5, 6, eval at 6, and the cut one

  def comparable(rs):
    return [{k: v for k, v in r.items() if k not in ("train/images_per_sec", "train/input_wait")}
            for r in rs]

  assert comparable(records(crashed)) == comparable(records(straight_dir))


def test_a_rerun_of_a_finished_run_does_nothing_unless_asked(straight, tmp_path):
  _, straight_dir, straight_result, _ = straight
  workdir = tmp_path / "finished"
  shutil.copytree(straight_dir, workdir)
  before = records(workdir)
  result, console = train(tiny_config(), workdir)
  assert "training finished at step 6" in console and "nothing to do" in console
  assert result == {"step": 6, "eval": straight_result["eval"], "preempted": None}
  assert records(workdir) == before
  result, console = train(tiny_config(reevaluate=True), workdir)
  assert result["eval"] == straight_result["eval"] and "step 6: eval accuracy" in console


def test_a_non_finite_state_is_never_saved(tmp_path):
  """Step 5's batch overflows BatchNorm's variance: loss and gradients stay finite, the running
  variance becomes inf. The run stops there, before saving step 5."""
  config = tiny_config(checkpoint_every_steps=1, **{"tiny.poison_at": 4})
  with pytest.raises(errors.NonFiniteLossError) as error:
    train(config, tmp_path)
  assert str(error.value).startswith("step 5 made the state non-finite")
  assert str(error.value).endswith("last good checkpoint: step 4")
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), "accuracy", read_only=True)
  assert max(ckpts.all_steps()) == 4
  state = final_state(tmp_path, config, 4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")


def test_gradient_accumulation_threads_batch_stats_through_the_micro_batches():
  config = tiny_config(grad_accum_steps=2)
  setup = loop.create_setup(config)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
  initial = jax.device_get(state)
  batch = next(setup.task.train_iterator(config, 0))
  step = steps.make_train_step(setup.task, config, setup.model, setup.tx, setup.schedule,
                               setup.mesh, setup.state_shardings, grad_accum_steps=2)
  new_state, step_metrics = step(state, jax.tree.map(jnp.asarray, batch))
  # By hand: micro-batch k holds examples k, k + 2, ...; the statistics go through both.
  variables = {"params": initial["params"], "batch_stats": initial["batch_stats"]}
  losses = []
  for k in range(2):
    micro = jax.tree.map(lambda x, k=k: x[k::2], batch)
    loss, _, new = setup.task.loss(setup.model, variables, micro, None)
    variables = {**variables, **new}
    losses.append(float(loss))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               jax.device_get(new_state["batch_stats"]), variables["batch_stats"])
  assert float(step_metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-6)
  assert bool(step_metrics["finite"])


def test_a_workdir_of_another_config_is_refused_before_anything_is_written(straight, tmp_path):
  _, straight_dir, _, _ = straight
  workdir = tmp_path / "used"
  shutil.copytree(straight_dir, workdir)
  saved = (workdir / "config.json").read_text()
  with pytest.raises(errors.ConfigError, match=r"holds checkpoints of another config "
                                               r"\(batch_size 8 -> 16, seed 0 -> 1\)"):
    train(tiny_config(batch_size=16, seed=1), workdir)
  assert (workdir / "config.json").read_text() == saved
  result, console = train(tiny_config(num_train_steps=7, eval_every_steps=7), workdir)
  assert "note: num_train_steps changed 6 -> 7" in console and result["step"] == 7
  assert json.loads((workdir / "dataset.json").read_text())["class_names"] == ["a", "b", "c"]


TWO_PROCESSES = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import test_train_tasks as t
from pvt_jax import tasks
from pvt_jax.train import loop
tasks.TASKS["tiny_bn"] = "test_train_tasks:TinyBatchNormTask"
result = loop.train_and_evaluate(t.tiny_config(), sys.argv[3])
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_two_processes_train_as_one_and_gather_each_eval_example_once(straight, tmp_path):
  """BatchNorm statistics over the global batch (SyncBN) and per-example eval outputs from both
  processes: the same state and metrics as one process, and every example counted once."""
  config, straight_dir, straight_result, _ = straight
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=f"{os.path.dirname(here)}:{here}", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, f"127.0.0.1:{port}", str(i),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [proc.communicate(timeout=300) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  results = []
  for proc, (out, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ")[-1]))
  assert results[0]["eval"] == results[1]["eval"] == straight_result["eval"]  # count 10
  ours, theirs = final_state(tmp_path, config), final_state(straight_dir, config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours,
               theirs)
