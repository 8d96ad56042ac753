"""Segmentation metrics against NumPy and mmseg's IoUMetric; the overlay PNG."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pvt_jax.metrics.segmentation import ConfusionMatrix, confusion_matrix, save_overlays, scores

NUM_CLASSES = 7


def random_maps(seed, shape=(4, 19, 23)):
  """Labels with ~20% ignored pixels and two classes (5, 6) never in the labels; predictions
  that agree with the labels on ~60% of pixels and never predict class 6."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, shape)
  labels[rng.random(shape) < 0.2] = 255
  predictions = np.where(rng.random(shape) < 0.6, np.minimum(labels, 5), rng.integers(0, 6, shape))
  return labels, predictions


def numpy_confusion(labels, predictions, num_classes):
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for label, prediction in zip(labels.ravel(), predictions.ravel(), strict=True):
    if label != 255:
      confusion[label, prediction] += 1
  return confusion


def test_confusion_matrix_equals_numpy_with_ignore_and_padding():
  labels, predictions = random_maps(0)
  mask = np.array([True, False, True, True])
  ours = jax.jit(confusion_matrix, static_argnums=2)(labels, predictions, NUM_CLASSES, mask)
  np.testing.assert_array_equal(np.asarray(ours),
                                numpy_confusion(labels[mask], predictions[mask], NUM_CLASSES))


def test_scores_equal_a_numpy_reference_and_skip_absent_classes():
  labels, predictions = random_maps(1)
  result = scores(numpy_confusion(labels, predictions, NUM_CLASSES))
  valid = labels != 255
  ious, accs = [], []
  for k in range(NUM_CLASSES):
    in_label, in_prediction = (labels == k) & valid, (predictions == k) & valid
    union = (in_label | in_prediction).sum()
    ious.append((in_label & in_prediction).sum() / union if union else np.nan)
    accs.append((in_label & in_prediction).sum() / in_label.sum() if in_label.sum() else np.nan)
  np.testing.assert_allclose(list(result["iou"].values()), ious)
  assert np.isnan(result["iou"]["6"]) and result["iou"]["5"] == 0.0  # absent vs only predicted
  np.testing.assert_allclose(result["miou"], np.mean(ious[:6]))  # class 6 left out of the mean
  np.testing.assert_allclose(result["macc"], np.mean(accs[:5]))
  np.testing.assert_allclose(result["aacc"], (labels == predictions)[valid].mean())


@pytest.mark.torch
def test_scores_equal_mmseg_iou_metric():
  import torch
  from openmmlab_reference import mmseg_models

  mmseg_models()
  from mmseg.evaluation.metrics import IoUMetric

  total = [torch.zeros(NUM_CLASSES, dtype=torch.float64) for _ in range(4)]
  accumulator = ConfusionMatrix(NUM_CLASSES)
  for seed in range(3):
    labels, predictions = random_maps(seed + 10)
    accumulator.update(confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions),
                                        NUM_CLASSES))
    for label, prediction in zip(labels, predictions, strict=True):
      areas = IoUMetric.intersect_and_union(torch.from_numpy(prediction),
                                            torch.from_numpy(label), NUM_CLASSES, 255)
      total = [t + a for t, a in zip(total, areas, strict=True)]
  theirs = IoUMetric.total_area_to_metrics(*total, metrics=["mIoU"])
  ours = accumulator.result()
  np.testing.assert_allclose(list(ours["iou"].values()), theirs["IoU"])
  np.testing.assert_allclose(list(ours["acc"].values()), theirs["Acc"])
  np.testing.assert_allclose(ours["aacc"], theirs["aAcc"])
  np.testing.assert_allclose(ours["miou"], np.nanmean(theirs["IoU"]))


def test_sharded_batch_gives_the_global_matrix():
  """Under jit over a batch sharded on 2 devices the matrix is already the global sum."""
  code = textwrap.dedent("""
      import numpy as np, jax
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from pvt_jax.metrics.segmentation import confusion_matrix
      mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))  # as the trainer's
      rng = np.random.default_rng(0)
      labels, predictions = rng.integers(0, 4, (4, 8, 8)), rng.integers(0, 4, (4, 8, 8))
      labels[0, :3] = 255
      put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
      out = jax.jit(confusion_matrix, static_argnums=2)(put(labels), put(predictions), 4)
      ref = confusion_matrix(labels, predictions, 4)
      assert out.sharding.is_fully_replicated and (np.asarray(out) == np.asarray(ref)).all()
      print("ok", int(np.asarray(out).sum()))
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["ok", str(4 * 64 - 24)]


def test_overlay_png(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((3, 64, 96, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (3, 50, 80))
  labels[:, :5] = 255
  drawn = save_overlays(tmp_path / "overlay.png", images, np.array([[64, 96]] * 3), labels,
                        np.array([[50, 80], [40, 70], [50, 80]]), labels,
                        masks=np.array([True, True, False]), class_names=["a", "b", "c"])
  assert drawn == 2
  with Image.open(tmp_path / "overlay.png") as png:
    assert png.format == "PNG" and png.height > png.width / 3  # two rows of three panels
