"""Semantic FPN on the trainer: train + eval through the CLIs, SyncBN statistics and the whole
run equal on 1 device, 2 devices and 2 processes, exact eval over the split (padding + mask) on
2 processes, resume bit-exact after SIGTERM, and the accumulator's metrics and overlay PNG.

The runs are tiny (B0, 64x64 canvases, batch 4, 4 steps) but go through the real code paths; the
three parallel runs start together and share the suite's persistent compilation cache.
"""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import REPO, config_flags, enable_compile_cache, relative_error, subprocess_env
from test_train_parallel import free_port, run_beside
from test_train_tasks import final_state as restore  # a workdir's state, host arrays

from configs import sem_fpn
from pvt_jax import tasks
from pvt_jax.checkpoints import dense, save_converted, write_state_dict
from pvt_jax.data.segmentation import transforms
from pvt_jax.metrics import segmentation as seg_metrics
from pvt_jax.models import create_model
from pvt_jax.models.semantic_fpn import create_semantic_fpn
from pvt_jax.tasks import segmentation
from pvt_jax.train import checkpointing, loop, metrics, steps
from pvt_jax.train.errors import ConfigError

CANVAS, NUM_EVAL = 64, 7  # 7 eval images in batches of 4: padded on every mesh
# The resume run: random augmentation (rescale, crop, flip, photometric) and head dropout on, so
# data order and RNG both matter.
RUN = {"num_train_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2,
       "log_every_steps": 1, "progress_bar": False, "seg.synthetic.num_eval": NUM_EVAL}
# The parallel runs: each step's global batch is the whole 16-canvas train split, unaugmented,
# and no dropout, so it holds the same examples however the processes split the data (each
# process reads its own shard, with its own augmentation seeds).
WHOLE_BATCH = {**RUN, "batch_size": 16, "seg.ratio_range": (1.0, 1.0), "seg.flip_probability": 0.0,
               "seg.photometric": False, "seg.dropout_rate": 0.0}


def seg_config(fashion_dir, overrides=None):
  config = sem_fpn.get_config("b0,runlocal")
  config.fashion_mnist_dir = fashion_dir
  config.update_from_flattened_dict(overrides or RUN)
  return config


def records(workdir):
  return metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))


def final_eval(workdir):
  return [r for r in records(workdir) if "eval/miou" in r][-1]


@pytest.fixture(scope="module")
def compile_cache():
  return enable_compile_cache()


@pytest.fixture(scope="module")
def runs(tiny_fashion_mnist, tmp_path_factory, compile_cache):
  """The same 4-step run on 1 device (this process), 2 devices (the CLI) and 2 processes (the
  local launcher, one device each)."""
  cache = compile_cache
  root = tmp_path_factory.mktemp("seg_runs")
  flags = [f"--config.fashion_mnist_dir={tiny_fashion_mnist}", *config_flags(WHOLE_BATCH)]
  env = subprocess_env(cache)
  config = seg_config(tiny_fashion_mnist, WHOLE_BATCH)
  procs = {
      "two_devices": subprocess.Popen(
          [sys.executable, "-m", "pvt_jax.main", "--config=configs/sem_fpn.py:runlocal",
           f"--workdir={root / 'two_devices'}", *flags], cwd=REPO,
          env=subprocess_env(cache, devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True),
      "two_processes": subprocess.Popen(
          [os.path.join(REPO, "launch", "local_multiprocess.sh"), "2",
           "configs/sem_fpn.py:runlocal", str(root / "two_processes"), *flags], cwd=REPO,
          env={**env, "PORT": str(free_port())}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True),
  }
  _, outputs = run_beside(
      procs, lambda: loop.train_and_evaluate(config, str(root / "one_device")), timeout=900)
  return {"config": config, "root": root, "cache": cache,
          "stdout": {name: out for name, (out, _) in outputs.items()}}


@pytest.mark.slow
def test_the_cli_trains_and_evaluates_writing_metrics_and_overlays(runs):
  workdir = runs["root"] / "two_devices"
  logged = records(workdir)
  assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4]
  evals = [r for r in logged if "eval/miou" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for record in evals:
    assert record["eval/count"] == NUM_EVAL and record["eval/pixels"] == NUM_EVAL * CANVAS ** 2
    assert {"eval/macc", "eval/aacc", "eval/iou/background", "eval/iou/Trouser"} <= set(record)
    assert 0 <= record["eval/miou"] <= 1
  for step in (2, 4):
    assert (workdir / segmentation.OVERLAY_FILE.format(step=step)).stat().st_size > 1000
  assert (workdir / metrics.PLOT_FILE).is_file()
  assert "step 4: eval mIoU" in runs["stdout"]["two_devices"]
  state = restore(workdir, runs["config"])
  assert set(state) == {"step", "params", "opt_state", "rng", "batch_stats"}


@pytest.mark.slow
def test_syncbn_statistics_and_training_equal_on_1_device_2_devices_and_2_processes(runs):
  """Per-device BatchNorm would give each device's variance, whose mean misses the spread
  between the devices' means: the running variances after 4 steps would differ from 1 device's.
  SyncBN (statistics of the global batch under jit) gives the same, up to summation order."""
  config = runs["config"]
  reference = restore(runs["root"] / "one_device", config)
  initial = jax.device_get(jax.jit(loop.create_setup(config).init_fn)())
  stats = reference["batch_stats"]["decode_head"]
  assert not np.allclose(stats["scale_heads_0_0"]["bn"]["var"],
                         initial["batch_stats"]["decode_head"]["scale_heads_0_0"]["bn"]["var"])
  losses = [r["train/loss"] for r in records(runs["root"] / "one_device") if "train/loss" in r]
  for run in ("two_devices", "two_processes"):
    other = restore(runs["root"] / run, config)
    # Summation order alone moves them by ~1e-5 after 4 Adam steps; per-device statistics would
    # move the running variances by the spread of the images' means, percents of them.
    stats_error = relative_error(reference["batch_stats"], other["batch_stats"])
    params_error = relative_error(reference["params"], other["params"])
    assert stats_error <= 1e-4 and params_error <= 1e-4, (run, stats_error, params_error)
    other_losses = [r["train/loss"] for r in records(runs["root"] / run) if "train/loss" in r]
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5, err_msg=run)


@pytest.mark.slow
def test_eval_is_exact_over_the_split_on_two_processes(runs):
  """7 images: each process gets 4 or 3 and pads to whole batches; every image and every pixel
  is scored once, and the metrics are the single device's."""
  one = final_eval(runs["root"] / "one_device")
  two = final_eval(runs["root"] / "two_processes")
  assert one["eval/count"] == two["eval/count"] == NUM_EVAL
  assert one["eval/pixels"] == two["eval/pixels"] == NUM_EVAL * CANVAS ** 2
  for name in ("eval/miou", "eval/macc", "eval/aacc"):
    assert two[name] == pytest.approx(one[name], abs=1e-4), name
  logs = {i: (runs["root"] / "two_processes" / f"process_{i}.log").read_text() for i in (0, 1)}
  assert "step 4: eval mIoU" in logs[0] and "step 4: eval" not in logs[1]
  assert (runs["root"] / "two_processes" / segmentation.OVERLAY_FILE.format(step=4)).is_file()


@pytest.mark.slow
def test_evaluate_prints_the_miou_of_a_workdir(runs):
  workdir = runs["root"] / "one_device"
  result = subprocess.run([sys.executable, "-m", "pvt_jax.evaluate", f"--checkpoint={workdir}"],
                          cwd=REPO, env=subprocess_env(runs["cache"]), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  best = checkpointing.TrainCheckpoints(str(workdir), "miou", read_only=True).best_step()
  (expected,) = [r for r in records(workdir) if r["step"] == best and "eval/miou" in r]
  assert printed["step"] == best and printed["count"] == NUM_EVAL
  assert printed["miou"] == expected["eval/miou"] and printed["aacc"] == expected["eval/aacc"]


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_bit_exactly(tiny_fashion_mnist, compile_cache,
                                                      tmp_path, monkeypatch):
  """SIGTERM while step 1's batch is read: the run stops after step 1 with a checkpoint (not a
  regular checkpoint step); the rerun ends with the uninterrupted run's state, bit for bit."""
  config = seg_config(tiny_fashion_mnist)
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  original = segmentation.SegmentationTask.train_iterator

  def terminated_while_reading(self, config, start_step):
    for step, batch in enumerate(original(self, config, start_step), start=start_step):
      if step == 0:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(segmentation.SegmentationTask, "train_iterator", terminated_while_reading)
  workdir = tmp_path / "stopped"
  stopped = loop.train_and_evaluate(config, str(workdir))
  assert stopped["preempted"] == "SIGTERM" and stopped["step"] == 1
  assert list(checkpointing.TrainCheckpoints(str(workdir), "miou",
                                             read_only=True).all_steps()) == [1]
  resumed = loop.train_and_evaluate(config, str(workdir))
  assert resumed["step"] == 4 and resumed["preempted"] is None
  jax.tree.map(np.testing.assert_array_equal, restore(workdir, config),
               restore(tmp_path / "straight", config))
  assert resumed["eval"] == straight["eval"]


@pytest.mark.slow
@pytest.mark.torch
def test_evaluate_prints_the_miou_of_a_converted_mmseg_checkpoint(compile_cache, tmp_path):
  """A random 5-class Semantic FPN in mmseg's layout -> pvt_jax.convert -> evaluate on a folder
  of 2 images, with the official whole-image pipeline (short side 512, aligned to 32). The
  expected mIoU: the full model's logits at the network input, resized to the label by torch's
  bilinear interpolation (as mmseg does), argmax, NumPy confusion matrix."""
  import torch
  import torch.nn.functional as F
  from PIL import Image

  num_classes, sizes = 5, [(40, 56), (48, 36)]
  model = create_semantic_fpn("b0", num_classes)
  variables = jax.device_get(model.init(jax.random.key(3), np.zeros((1, 64, 64, 3), np.float32)))
  variables["batch_stats"] = jax.tree.map(  # statistics that matter, as trained ones would
      lambda x: np.random.default_rng(x.size).uniform(0.5, 1.5, x.shape).astype(np.float32),
      variables["batch_stats"])
  state_dict = dense.export_state_dict(variables, "mmseg")
  write_state_dict(tmp_path / "fpn.pth", {key: np.array(v) for key, v in state_dict.items()})
  convert = subprocess.run([sys.executable, "-m", "pvt_jax.convert",
                            f"--input={tmp_path / 'fpn.pth'}", f"--output={tmp_path / 'fpn'}"],
                           cwd=REPO, env=subprocess_env(compile_cache), capture_output=True,
                           text=True, timeout=600)
  assert convert.returncode == 0, convert.stderr[-3000:]
  rng = np.random.default_rng(0)
  root, confusion = tmp_path / "data", np.zeros((num_classes, num_classes), np.int64)
  for split in ("training", "validation"):
    os.makedirs(root / "images" / split)
    os.makedirs(root / "annotations" / split)
  for i, (h, w) in enumerate(sizes):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
    for split in ("training", "validation"):
      Image.fromarray(image).save(root / "images" / split / f"{i}.png")
      Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    (rescaled,), (aligned,) = transforms.eval_sizes(np.array([h]), np.array([w]), (2048, 512), 32)
    network_input = transforms.eval_image(image.astype(np.float32), rescaled, aligned).numpy()
    logits = model.apply(variables, network_input[None])
    resized = F.interpolate(torch.from_numpy(np.asarray(logits)).permute(0, 3, 1, 2), (h, w),
                            mode="bilinear", align_corners=False)
    prediction = resized.argmax(1)[0].numpy()
    np.add.at(confusion, (label.ravel(), prediction.ravel()), 1)
  result = subprocess.run([sys.executable, "-m", "pvt_jax.evaluate",
                           f"--checkpoint={tmp_path / 'fpn'}", f"--dataset=folder:{root}"],
                          cwd=REPO, env=subprocess_env(compile_cache), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  expected = seg_metrics.scores(confusion)
  assert printed["step"] is None and printed["count"] == 2
  assert printed["pixels"] == sum(h * w for h, w in sizes)
  assert printed["miou"] == pytest.approx(expected["miou"], abs=1e-3)
  assert printed["aacc"] == pytest.approx(expected["aacc"], abs=1e-3)


@pytest.mark.slow
def test_init_from_takes_an_imagenet_backbone_or_a_whole_semantic_fpn(tiny_fashion_mnist,
                                                                      compile_cache, tmp_path):
  config = seg_config(tiny_fashion_mnist)
  setup = loop.create_setup(config)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
  variables = steps.model_variables(state)
  shardings = steps.model_variables(setup.state_shardings)
  fresh = jax.device_get(variables)
  metadata = {"variant": "b0", "source_file": "x.pth", "source_sha256": "0",
              "source_format": "official"}
  # An ImageNet classifier (the paper's start): its body becomes the backbone, its head goes.
  classifier = create_model("b0", num_classes=10)
  params = jax.device_get(classifier.init(jax.random.key(5), np.zeros((1, 32, 32, 3)))["params"])
  save_converted(tmp_path / "classifier", params, {**metadata, "num_classes": 10})
  config.init_from = str(tmp_path / "classifier")
  loaded, what = setup.task.load_init(config, variables, shardings)
  assert what == "its backbone; new neck and head"
  loaded = jax.device_get(loaded)
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["backbone"],
               {name: value for name, value in params.items() if name != "head"})
  for part in ("neck", "decode_head"):
    jax.tree.map(np.testing.assert_array_equal, loaded["params"][part], fresh["params"][part])
  jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], fresh["batch_stats"])
  # A converted Semantic FPN of the same classes: all of it, BN statistics included.
  trained = jax.tree.map(lambda x: x + 1, fresh)
  save_converted(tmp_path / "fpn", trained["params"],
                 {**metadata, "num_classes": 11, "task": "segmentation"},
                 batch_stats=trained["batch_stats"])
  config.init_from = str(tmp_path / "fpn")
  loaded, what = setup.task.load_init(config, variables, shardings)
  assert what == "the whole Semantic FPN"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), trained)


def test_accumulator_scores_the_summed_confusion_and_draws_this_processes_rows(tmp_path):
  rng = np.random.default_rng(0)
  num_classes, names = 3, ["bg", "a", "b"]
  accumulator = segmentation.SegmentationAccumulator(num_classes, names, num_overlay_images=2)
  totals = np.zeros((num_classes, num_classes), np.int64)
  for _ in range(2):
    confusion = rng.integers(0, 50, (num_classes, num_classes))
    totals += confusion
    batch = {"image": rng.standard_normal((2, 16, 16, 3)).astype(np.float32),
             "image_size": np.full((2, 2), 16), "label": rng.integers(0, 3, (2, 16, 16)),
             "label_size": np.full((2, 2), 16), "mask": np.array([True, False])}
    # The global batch's first rows: this process's 2, then another process's.
    accumulator.update({"confusion": confusion, "count": np.int32(1),
                        "overlay": rng.integers(0, 3, (4, 16, 16)).astype(np.uint8)}, batch)
  result = accumulator.result()
  expected = seg_metrics.scores(totals, names)
  assert result["miou"] == expected["miou"] and result["iou"] == expected["iou"]
  assert result["count"] == 2 and result["pixels"] == totals.sum()
  accumulator.write_files(str(tmp_path), 7)
  assert (tmp_path / "overlays_step_7.png").is_file()
  assert "mIoU" in tasks.get_task("segmentation").describe_eval(result)


@pytest.mark.parametrize("field, value, message", [
    ("seg.crop_size", (0, 64), "must be positive"),
    ("seg.ratio_range", (2.0, 1.0), "0 < low <= high"),
    ("seg.cat_max_ratio", 0.0, "must be in (0, 1]"),
    ("seg.eval_canvas_multiple", 48, "multiple of seg.size_divisor=32"),
    ("seg.num_overlay_images", 9, "must be in [0, 8]"),
    ("seg.dropout_rate", 1.0, "must be in [0, 1)"),
])
def test_bad_segmentation_fields_fail_in_one_line(field, value, message):
  config = sem_fpn.get_config("b0,runlocal")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=r"^[^\n]*" + re.escape(message)):
    tasks.get_task("segmentation").check_config(config)
