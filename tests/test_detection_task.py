"""RetinaNet on the trainer (the `detection` task): the CLI trains, evaluates and writes the
detections; `python -m pvt_jax.evaluate` scores a detection workdir; 1 device, 2 devices and 2
processes give the same losses and the same COCO evaluation, each val image once; a resumed run is
bit-exact. B0 at 64 px on the tiny Fashion-MNIST fixture, a few steps."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import REPO, enable_compile_cache, relative_error, restore_params, subprocess_env
from test_train_parallel import run_beside, start_parallel_runs

from configs import retinanet
from pvt_jax.tasks import detection as detection_task
from pvt_jax.train import loop, metrics
from pvt_jax.train.errors import ConfigError

pytestmark = [pytest.mark.slow]

NUM_VAL = 8
# runlocal (batch 4, 6 steps, eval and checkpoint every 3) on 64 px canvases; no stochastic
# depth, so runs on different meshes see the same computation; every score above 0 kept, so the
# random-weight detector has 100 detections per image and a non-trivial AP to compare.
TINY = {"synthetic.image_size": 64, "image_scale": (64, 64), "canvas_sizes": ((64, 64),),
        "synthetic.item_size": (20, 40), "synthetic.num_val": NUM_VAL, "drop_path_rate": 0.0,
        "detection.score_thr": 0.0, "detection.images_per_group": 2, "progress_bar": False,
        "log_every_steps": 1}


def tiny_config(fashion_mnist_dir):
  config = retinanet.get_config("runlocal")
  config.fashion_mnist_dir = fashion_mnist_dir
  config.update_from_flattened_dict(TINY)
  return config


def config_flags(fashion_mnist_dir):
  return [f"--config.fashion_mnist_dir={fashion_mnist_dir}",
          *(f"--config.{k}={v}" for k, v in TINY.items())]


def history(workdir):
  records = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  return ([r["train/loss"] for r in records if "train/loss" in r],
          [r for r in records if "eval/AP" in r])


def detections(workdir, step):
  with open(detection_task.output_paths(str(workdir), step)[0]) as f:
    return sorted((d["image_id"], d["category_id"], d["score"], *d["bbox"]) for d in json.load(f))


@pytest.fixture(scope="module")
def compile_cache():
  return enable_compile_cache()


@pytest.fixture(scope="module")
def runs(tiny_fashion_mnist, compile_cache, tmp_path_factory):
  """The tiny run on 1 device (this process), 2 devices and 2 processes (subprocesses, in
  parallel)."""
  root = tmp_path_factory.mktemp("detection_runs")
  command = [sys.executable, "-m", "pvt_jax.main", "--config=configs/retinanet.py:runlocal",
             *config_flags(tiny_fashion_mnist)]
  procs = start_parallel_runs(command, root, compile_cache)

  def one_device():
    assert jax.device_count() == 1
    return loop.train_and_evaluate(tiny_config(tiny_fashion_mnist), str(root / "one_device"))

  result, outputs = run_beside(procs, one_device, timeout=900)
  return root, result, outputs


def test_training_evaluates_with_coco_and_writes_detections(runs):
  root, result, _ = runs
  losses, evals = history(root / "one_device")
  assert len(losses) == 6 and result["step"] == 6
  assert [e["step"] for e in evals] == [3, 6]
  for record in evals:
    assert record["eval/num_images"] == NUM_VAL
    assert record["eval/num_detections"] == 100 * NUM_VAL  # score_thr 0: every image full
    assert 0 < record["eval/AP50"] <= 1 and 0 <= record["eval/AP"] <= record["eval/AP50"]
  assert result["eval"]["AP"] == evals[-1]["eval/AP"]
  for step in (3, 6):
    json_path, png_path = detection_task.output_paths(str(root / "one_device"), step)
    assert os.path.getsize(png_path) > 1000
    with open(json_path) as f:
      written = json.load(f)
    assert len(written) == 100 * NUM_VAL
    assert {d["image_id"] for d in written} == set(range(1, NUM_VAL + 1))
    assert {"bbox", "score", "category_id"} <= set(written[0])


def test_one_device_two_devices_and_two_processes_agree(runs, tiny_fashion_mnist):
  root, _, outputs = runs
  config = tiny_config(tiny_fashion_mnist)
  losses, evals = history(root / "one_device")
  params, _ = restore_params(str(root / "one_device"), config)
  for run in ("two_devices", "two_processes"):
    other_losses, other_evals = history(root / run)
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5, err_msg=run)
    # Each val image scored once on every process count, to the same detections.
    for ours, theirs in zip(evals, other_evals, strict=True):
      assert theirs["eval/num_images"] == NUM_VAL
      assert theirs["eval/num_detections"] == ours["eval/num_detections"]
      assert theirs["eval/AP"] == pytest.approx(ours["eval/AP"], abs=1e-3), run
    mine, other = detections(root / "one_device", 6), detections(root / run, 6)
    assert [d[:2] for d in other] == [d[:2] for d in mine]
    np.testing.assert_allclose([d[2:] for d in other], [d[2:] for d in mine], rtol=1e-3,
                               atol=1e-3)
    other_params, step = restore_params(str(root / run), config)
    assert step == 6 and relative_error(params, other_params) <= 1e-5, run
  # Process 0 alone reports and writes the files.
  assert "step 6: eval AP" in outputs["process0"][0]  # stdout
  assert "step 6: eval" not in outputs["process1"][0]


def test_resume_from_a_checkpoint_is_bit_exact(runs, tiny_fashion_mnist, tmp_path):
  root, _, _ = runs
  config = tiny_config(tiny_fashion_mnist)
  resumed = tmp_path / "resumed"
  shutil.copytree(root / "one_device", resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  result = loop.train_and_evaluate(config, str(resumed))
  assert result["step"] == 6
  straight, _ = restore_params(str(root / "one_device"), config)
  again, _ = restore_params(str(resumed), config)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert history(resumed)[0] == history(root / "one_device")[0]
  assert detections(resumed, 6) == detections(root / "one_device", 6)


def test_evaluate_cli_prints_the_workdirs_coco_ap(runs, compile_cache):
  root, result, _ = runs
  proc = subprocess.run([sys.executable, "-m", "pvt_jax.evaluate",
                         f"--checkpoint={root / 'one_device'}", "--step=6"], cwd=REPO,
                        env=subprocess_env(compile_cache), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed["step"] == 6 and printed["num_images"] == NUM_VAL
  assert printed["AP"] == pytest.approx(result["eval"]["AP"], abs=1e-6)
  assert printed["AP50"] == pytest.approx(result["eval"]["AP50"], abs=1e-6)


def test_bad_detection_settings_fail_before_the_data_are_opened(tiny_fashion_mnist):
  task = detection_task.DetectionTask()
  cases = {"max_boxes": (0, "max_boxes=0 must be at least 1"),
           "canvas_sizes": (((64, 50),), "must be (h, w) pairs, positive multiples of "
                                         "size_divisor=32"),
           "detection.images_per_group": (3, "detection.images_per_group=3 must divide the "
                                             "(micro-)batch of 4 images (0: the whole batch)")}
  for field, (value, message) in cases.items():
    config = tiny_config(tiny_fashion_mnist)
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
      task.check_config(config)
