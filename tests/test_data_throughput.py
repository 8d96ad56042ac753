"""The input-pipeline benchmark (`python -m pvt_jax.benchmark --pipeline`, data/throughput.py)
and the train step's batch augmentation on two devices."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=900):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "pvt_jax.benchmark", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_jpeg_folder_is_imagenet_like(tmp_path):
  from pvt_jax.data import throughput
  root = throughput.make_jpeg_folder(str(tmp_path / "f"), 6, 2, short_side=(333, 500))
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train"))
                 for f in fs)
  assert len(files) == 6 and len(os.listdir(os.path.join(root, "train"))) == 2
  for name in files:
    with Image.open(name) as image:
      assert image.format == "JPEG" and image.mode == "RGB"
      assert 333 <= min(image.size) <= 500 and 1.19 < max(image.size) / min(image.size) < 1.51
      pixels = np.asarray(image, np.float32)
    # Photo-like, not flat: texture at every scale, and files the size of q90 photos.
    assert pixels.std() > 30 and np.abs(np.diff(pixels, axis=1)).mean() > 5
    assert os.path.getsize(name) > 40_000
  mtimes = [os.path.getmtime(f) for f in files]
  throughput.make_jpeg_folder(root, 6, 2)  # complete: kept as it is
  assert [os.path.getmtime(f) for f in files] == mtimes


@pytest.mark.slow
@pytest.mark.torch
def test_pipeline_benchmark_quick(tmp_path):
  proc = _cli("--pipeline", "--quick", f"--output_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "pipeline.json") as f:
    results = json.load(f)
  assert results["cores"] == len(os.sched_getaffinity(0))
  for mode in ("train", "eval"):
    r = results[mode]
    for name in ("pvt_jax", "timm"):
      assert len(r[name]["rounds"]["img_per_s"]) == 2 and r[name]["img_per_s"] > 0
      assert r[name]["cpu_ms_per_img"] > 0
    assert r["ratio"] == pytest.approx(r["pvt_jax"]["img_per_s"] / r["timm"]["img_per_s"])
  table = (tmp_path / "pipeline.md").read_text()
  assert "python -m pvt_jax.benchmark --pipeline --quick" in table
  assert "| train |" in table and "| eval |" in table and table in proc.stdout


def test_pipeline_benchmark_rejects_a_folder_without_train_split(tmp_path):
  os.makedirs(tmp_path / "images" / "val" / "a")
  proc = _cli("--pipeline", "--quick", f"--folder={tmp_path / 'images'}",
              f"--output_dir={tmp_path / 'out'}", timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "has no train/ split" in lines[-1]


def test_batch_augmentation_is_the_same_on_one_and_two_devices():
  # The train step's normalisation, erasing and mixup of a global batch sharded over two
  # devices equal those of the unsharded batch (per-example keys split over the global batch).
  code = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from pvt_jax import tasks
      from pvt_jax.configs import classification
      config = classification.get_config("b0", "imagenet")
      task = tasks.get_task("classification")
      rng = np.random.default_rng(0)
      batch = {"image": rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8),
               "label": rng.integers(0, 5, 8).astype(np.int32)}
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
      augment = jax.jit(lambda b, k: task.augment_batch(config, b, k))
      outs = []
      for b in (batch, sharded):
        outs.append(jax.device_get(augment(b, jax.random.key(3))))
      for key in outs[0]:
        np.testing.assert_array_equal(outs[0][key], outs[1][key])
      erased = (outs[0]["image"] != jax.device_get(augment(batch, jax.random.key(4)))["image"])
      print("ok", len(jax.devices()), bool(erased.any()))
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["ok", "2", "True"]
