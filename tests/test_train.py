"""Trainer in one process: optimizer, shardings, gradient accumulation, exact resume after SIGTERM,
exact evaluation, fine-tuning from a converted checkpoint. Real data (the tiny Fashion-MNIST
fixture) and real code paths throughout."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from configs import b0
from pvt_jax import data, tasks
from pvt_jax.checkpoints import load_converted, save_converted
from pvt_jax.data import batch_augment
from pvt_jax.models import create_model
from pvt_jax.train import checkpointing, loop, metrics, optimizer, sharding, steps, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The resume / fine-tuning runs: 40-image batches (5 steps per epoch of the 200-image fixture),
# stochastic depth and random augmentation on, so data order and RNG both matter.
RESUME = {"batch_size": 40, "eval_batch_size": 16, "num_train_steps": 10, "log_every_steps": 1,
          "eval_every_steps": 5, "checkpoint_every_steps": 5, "drop_path_rate": 0.1,
          "progress_bar": False}


# One step = a fixed 32-image slice of the train split, deterministic preprocessing, no stochastic
# depth: the global batch holds the same examples however the processes split the data, so runs
# on different device / process counts can be compared. 64 px so that every attention layer sees
# more than one key: at 32 px every spatial reduction ends at 1x1, q/k get no gradient at all and
# Adam turns their rounding noise into full-size updates.
WHOLE_BATCH = {
    "image_size": 64, "train_split": "train[:32]", "batch_size": 32, "eval_batch_size": 16,
    "cache": True, "num_train_steps": 3, "log_every_steps": 1, "eval_every_steps": 3,
    "checkpoint_every_steps": 3, "drop_path_rate": 0.0, "progress_bar": False, "crop_pct": 1.0,
    "aug.random_resized_crop": False, "aug.hflip": False, "aug.randaugment": "",
    "aug.random_erasing": 0.0, "aug.mixup_alpha": 0.0, "aug.cutmix_alpha": 0.0,
    "aug.mixup_prob": 0.0, "aug.repeated_aug": 1,
}


def tiny_config(fashion_mnist_dir, overrides):
  config = b0.get_config("runlocal")
  config.fashion_mnist_dir = fashion_mnist_dir
  config.update_from_flattened_dict(overrides)
  return config


def config_flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def relative_error(a, b):
  """||a - b|| / ||a|| over whole trees.

  Whole trees, not leaf by leaf: the key half of every attention kv bias has a mathematically
  zero gradient (softmax ignores a constant shift of the logits), so Adam turns pure rounding
  noise into small updates there, which a per-leaf comparison would be measuring.
  """
  flat_a, flat_b = (np.concatenate([np.ravel(np.asarray(x, np.float64))
                                    for x in jax.tree.leaves(t)]) for t in (a, b))
  return np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_a)


def restore_params(workdir, config, step=None):
  """Params of a workdir checkpoint, restored onto this process's (1-device) mesh."""
  setup = loop.create_setup(config)
  ckpts = checkpointing.TrainCheckpoints(workdir, read_only=True)
  target = checkpointing.abstract_like(setup.abstract_state, setup.state_shardings)
  state = ckpts.restore(target, step)
  ckpts.close()
  return jax.device_get(state["params"]), int(state["step"])


def subprocess_env(cache_dir, devices=1):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def enable_compile_cache() -> str:
  """A persistent compilation cache shared by this process and the subprocesses, kept between
  sessions: each identical program (same config, same device count) compiles once, not once per
  process and run; compiling the train step is most of these tests' time on a small CPU.
  Entries are keyed by the program and the jax version, so a stale cache is never wrong."""
  path = os.environ.get("PVT_JAX_TEST_COMPILE_CACHE",
                        os.path.join(tempfile.gettempdir(), "pvt_jax_test_compile_cache"))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return path


@pytest.fixture(scope="module")
def compile_cache():
  return enable_compile_cache()


def test_learning_rate_schedule_follows_the_official_recipe():
  config = b0.get_config("imagenet")
  config.batch_size = 256
  schedule = optimizer.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  peak = 5e-4 * 256 / 512
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)
  # 5 warmup epochs (50 steps), then cosine to 100.
  assert float(schedule(25)) == pytest.approx(1e-6 + (peak - 1e-6) / 2, rel=1e-5)
  assert float(schedule(50)) == pytest.approx(peak, rel=1e-5)
  assert float(schedule(75)) == pytest.approx(1e-5 + (peak - 1e-5) / 2, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(1e-5, rel=1e-5)


@pytest.mark.torch
def test_poly_schedule_matches_mmengine():
  """The Semantic FPN recipe's 'poly' (power 0.9) against mmengine's PolyLR, per iteration. The
  official runs (mmseg 0.x, mmcv's PolyLrUpdaterHook) decay over (1 - iter / max_iters): that is
  PolyLR with end = max_iters + 1 (PolyLR reaches eta_min at end - 1)."""
  torch = pytest.importorskip("torch")
  from mmengine.optim.scheduler import PolyLR

  from configs import sem_fpn
  config = sem_fpn.get_config("b0,ade20k")
  config.optimizer.min_lr = 1e-6
  total = 200
  sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
  scheduler = PolyLR(sgd, eta_min=1e-6, power=0.9, by_epoch=False, begin=0, end=total + 1)
  ours = optimizer.learning_rate_schedule(config, steps_per_epoch=1, total_steps=total)
  for step in range(total + 20):  # held at min_lr after the last step
    np.testing.assert_allclose(float(ours(step)), sgd.param_groups[0]["lr"], rtol=1e-5)
    scheduler.step()


def test_weight_decay_skips_biases_and_norms_and_clipping_is_configured():
  params = {"dense": {"kernel": np.ones((3, 4)), "bias": np.ones(4)},
            "norm": {"scale": np.ones(4), "bias": np.ones(4)},
            "dwconv": {"kernel": np.ones((3, 3, 1, 4))}}
  mask = optimizer.weight_decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False},
                  "norm": {"scale": False, "bias": False}, "dwconv": {"kernel": True}}
  config = b0.get_config("imagenet")
  # Decoupled decay: with zero gradients only the decayed (kernel) entries move, by lr * wd * p.
  tx = optimizer.create_optimizer(config, lambda step: 0.1)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert np.allclose(updates["dense"]["kernel"], -0.1 * 0.05)
  assert np.all(updates["dense"]["bias"] == 0) and np.all(updates["norm"]["scale"] == 0)


def test_gradient_clipping_when_configured():
  """b3-b5 clip the global gradient norm at 1: a huge first gradient then weighs like a unit one
  in Adam's moments (Adam alone is scale-invariant only within one step)."""
  from configs import b3

  clipped, plain = b3.get_config("imagenet"), b0.get_config("imagenet")
  assert (clipped.optimizer.grad_clip_norm, plain.optimizer.grad_clip_norm) == (1.0, 0.0)
  params = {"w": np.ones((2, 2), np.float32)}
  huge, small = {"w": np.full((2, 2), 1e3, np.float32)}, {"w": np.array([[.1, -.2], [.3, 0]],
                                                                          np.float32)}
  unit = {"w": huge["w"] / np.linalg.norm(huge["w"])}

  def two_steps(config, first):
    tx = optimizer.create_optimizer(config, lambda step: 1.0)
    state = tx.init(params)
    _, state = tx.update(first, state, params)
    return tx.update(small, state, params)[0]["w"]

  np.testing.assert_allclose(two_steps(clipped, huge), two_steps(plain, unit), rtol=1e-5)
  assert not np.allclose(two_steps(plain, huge), two_steps(plain, unit), rtol=1e-3)


def test_fsdp_shards_the_largest_divisible_dimension():
  assert sharding._fsdp_spec((256, 10), 2) == jax.sharding.PartitionSpec("fsdp")
  assert sharding._fsdp_spec((3, 3, 1, 160), 2) == jax.sharding.PartitionSpec(
      None, None, None, "fsdp")
  assert sharding._fsdp_spec((7, 5), 2) == jax.sharding.PartitionSpec()
  assert sharding._fsdp_spec((), 2) == jax.sharding.PartitionSpec()
  assert sharding._fsdp_spec((256, 10), 1) == jax.sharding.PartitionSpec()


def test_evaluation_compiles_with_the_backends_inference_options():
  model = create_model("b0", num_classes=10)
  mesh = sharding.create_mesh()
  variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  n = len(jax.devices())
  batch = {"image": jax.ShapeDtypeStruct((n, 32, 32, 3), np.float32),
           "label": jax.ShapeDtypeStruct((n,), np.int32),
           "mask": jax.ShapeDtypeStruct((n,), np.bool_)}
  eval_step = steps.make_eval_step(tasks.get_task("classification"), model, mesh,
                                   sharding.state_shardings(variables, mesh))
  hlo = eval_step.lower(variables, batch).compile().as_text()
  assert "__ynn_fusion" not in hlo  # the CPU options: see pvt_jax/cpu/compile_options.py


def test_gradient_accumulation_equals_the_big_batch_update(tiny_fashion_mnist, compile_cache):
  del compile_cache
  config = tiny_config(tiny_fashion_mnist, WHOLE_BATCH)
  setup = loop.create_setup(config)
  batch = sharding.global_batch(next(data.train_iterator(config)), setup.mesh)
  results = []
  for accum in (1, 2):
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
    step = steps.make_train_step(setup.task, config, setup.model, setup.tx, setup.schedule,
                                 setup.mesh, setup.state_shardings, grad_accum_steps=accum)
    state, metrics = step(state, batch)
    results.append((jax.device_get(state["params"]), jax.device_get(state["opt_state"]),
                    float(metrics["loss"]), float(metrics["grad_norm"])))
  (big, big_moments, big_loss, big_norm), (accum, accum_moments, accum_loss, accum_norm) = results
  assert accum_loss == pytest.approx(big_loss, rel=1e-5)
  assert accum_norm == pytest.approx(big_norm, rel=1e-5)
  assert relative_error(big_moments, accum_moments) < 1e-5  # Adam's moments: the gradients
  assert relative_error(big, accum) < 1e-5


@pytest.fixture(scope="module")
def straight_run(tiny_fashion_mnist, compile_cache, tmp_path_factory):
  """10 uninterrupted steps (two epochs) of the RESUME config."""
  del compile_cache
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = tiny_config(tiny_fashion_mnist, RESUME)
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_resume_after_sigterm_is_exact(straight_run, tiny_fashion_mnist, compile_cache, tmp_path):
  config, straight_dir, straight = straight_run
  assert straight["step"] == 10 and not straight["preempted"]
  workdir = str(tmp_path / "interrupted")
  command = [sys.executable, "-m", "pvt_jax.main", "--config=configs/b0.py:runlocal",
             f"--workdir={workdir}", f"--config.fashion_mnist_dir={tiny_fashion_mnist}",
             *config_flags(RESUME)]
  proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(compile_cache),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:  # signal once step 2 has been logged
    if os.path.exists(metrics_file) and '"step": 2,' in open(metrics_file).read():
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  stopped = re.search(r"stopped on SIGTERM at step (\d+); checkpoint saved", out)
  assert stopped, out + err[-2000:]
  stop_step = int(stopped.group(1))
  assert 2 <= stop_step < 10
  assert checkpointing.TrainCheckpoints(workdir, read_only=True).latest_step() == stop_step

  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    resumed = loop.train_and_evaluate(config, workdir)
  assert f"resuming from step {stop_step}" in console.getvalue()
  assert resumed["step"] == 10
  # Each step logged once; the stopped window and the resumed one are shorter, and say so.
  logged = [r for r in metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
            if "train/loss" in r]
  assert [r["step"] for r in logged] == sorted({r["step"] for r in logged})
  assert sum(r["train/window_steps"] for r in logged) == 10
  final, _ = restore_params(workdir, config)
  expected, _ = restore_params(straight_dir, config)
  jax.tree.map(np.testing.assert_array_equal, final, expected)  # bit-exact
  assert resumed["eval"] == straight["eval"]


def test_evaluation_counts_every_example_once(straight_run):
  config, workdir, result = straight_run
  params, _ = restore_params(workdir, config)
  info = data.dataset_info(config)
  assert info.num_eval_examples == 50 and 50 % config.eval_batch_size  # padded last batch
  batches = list(data.eval_iterator(config))
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert len(labels) == 50
  model = create_model("b0", num_classes=10)
  # The eval batches hold uint8 pixels; the eval step normalises them.
  logits = np.asarray(jax.jit(model.apply)({"params": params}, batch_augment.normalize(images)),
                      np.float64)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert result["eval"]["count"] == 50
  assert result["eval"]["top1"] == pytest.approx(np.mean(top5[:, 0] == labels))
  assert result["eval"]["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
  peak = logits.max(1, keepdims=True)
  log_probs = logits - peak - np.log(np.exp(logits - peak).sum(1, keepdims=True))
  assert result["eval"]["loss"] == pytest.approx(-np.mean(log_probs[np.arange(50), labels]),
                                                 rel=1e-4)


def test_finetuning_starts_from_the_converted_checkpoint(tiny_fashion_mnist, compile_cache,
                                                         tmp_path):
  del compile_cache
  pretrained = create_model("b0", num_classes=1000).init(jax.random.key(42),
                                                         np.zeros((1, 32, 32, 3)))["params"]
  converted = str(tmp_path / "converted")
  save_converted(converted, pretrained, {"variant": "b0", "num_classes": 1000,
                                         "source_file": "pvt_v2_b0.pth", "source_sha256": "0",
                                         "source_format": "official"})
  config = tiny_config(tiny_fashion_mnist, RESUME)
  config.init_from = converted
  config.reinit_head = True
  setup = loop.create_setup(config)
  fresh = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
  variables, _ = setup.task.load_init(config, {"params": fresh["params"]},
                                      {"params": setup.state_shardings["params"]})
  params = jax.device_get(variables["params"])
  body = {k: v for k, v in load_converted(converted).params.items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in body}, body)
  assert params["head"]["kernel"].shape == (256, 10)
  np.testing.assert_array_equal(params["head"]["kernel"],
                                jax.device_get(fresh["params"]["head"]["kernel"]))

  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    result = loop.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert f"initialised from {converted} (a new head)" in console.getvalue()
  tuned, _ = restore_params(str(tmp_path / "finetune"), config)
  tuned_body = {k: tuned[k] for k in body}
  assert 0 < relative_error(body, tuned_body) < 0.5  # trained, but from the checkpoint
  assert result["step"] == RESUME["num_train_steps"]

  config.variant = "b1"
  with pytest.raises(loop.ConfigError, match="holds a b0 checkpoint"):
    setup.task.load_init(config, {"params": fresh["params"]},
                         {"params": setup.state_shardings["params"]})


def test_a_workdir_config_from_before_new_fields_is_filled_with_defaults(tmp_path):
  """config.json of a run started by an earlier version lacks the fields added since."""
  config = b0.get_config("runlocal")
  config.batch_size = 16
  saved = workdir.as_json(config)
  del saved["optimizer"]["schedule"], saved["reevaluate"]
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(saved))
  loaded = workdir.load_run_config(str(tmp_path))
  assert (loaded.optimizer.schedule, loaded.reevaluate, loaded.batch_size) == (
      "warmup_cosine", False, 16)


def test_an_image_folder_has_class_names_and_counts(tmp_path):
  """What the start-up summary and dataset.json show for a folder dataset."""
  from PIL import Image

  for split, counts in (("train", {"cat": 3, "dog": 2}), ("val", {"cat": 1, "dog": 2})):
    for name, n in counts.items():
      (tmp_path / split / name).mkdir(parents=True)
      for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / name / f"{i}.png")
  config = b0.get_config("runlocal")
  config.dataset, config.batch_size = f"folder:{tmp_path}", 2
  config.train_split, config.eval_split = "train", "val"
  info = tasks.get_task("classification").dataset_info(config)
  assert info.class_names == ("cat", "dog")
  assert (info.train_class_counts, info.eval_class_counts) == ((3, 2), (1, 2))
  assert (info.num_train_examples, info.num_eval_examples, info.steps_per_epoch) == (5, 3, 2)
  assert json.loads(json.dumps(info.record()))["class_names"] == ["cat", "dog"]


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=2)
  top1 = {2: 0.9, 4: 0.5, 6: 0.7}  # steps with an eval; the others have none
  for step in range(1, 8):
    ckpts.save(step, {"step": np.int32(step), "w": np.full(3, step, np.float32)},
               {"top1": top1[step]} if step in top1 else None)
  ckpts.wait()
  assert sorted(ckpts.all_steps()) == [2, 6, 7]
  assert ckpts.best_step() == 2 and ckpts.latest_step() == 7
  ckpts.close()
  reopened = checkpointing.TrainCheckpoints(str(tmp_path), read_only=True)
  target = {"step": jax.ShapeDtypeStruct((), np.int32), "w": jax.ShapeDtypeStruct((3,),
                                                                                  np.float32)}
  np.testing.assert_array_equal(reopened.restore(target, 2)["w"], [2, 2, 2])
