"""pvt_jax.detection's box ops, NMS, focal loss and assignment against independent references
(NumPy, torchvision) and their defining properties."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvt_jax import detection
from pvt_jax.detection import boxes as box_ops
from pvt_jax.detection import losses


def _boxes(rng, count, extent=100.0, min_size=2.0):
  xy = rng.uniform(0, extent, (count, 2))
  wh = rng.uniform(min_size, extent / 2, (count, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_iou_matrix_matches_brute_force():
  rng = np.random.default_rng(0)
  a, b = _boxes(rng, 7), _boxes(rng, 5)
  b[0] = a[0]          # identical -> 1
  b[1] = a[1] + 500    # disjoint -> 0
  want = np.zeros((7, 5))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
      want[i, j] = iw * ih / union
  got = box_ops.iou_matrix(a, b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[0, 0] == pytest.approx(1.0) and got[1, 1] == 0.0


def test_box_coding_round_trip_and_clipping():
  rng = np.random.default_rng(1)
  anchors, gt = _boxes(rng, 50), _boxes(rng, 50)
  means, stds = (0.1, -0.1, 0.0, 0.2), (0.1, 0.1, 0.2, 0.2)
  for m, s in (((0.0,) * 4, (1.0,) * 4), (means, stds)):
    deltas = box_ops.encode(anchors, gt, m, s)
    np.testing.assert_allclose(box_ops.decode(anchors, deltas, means=m, stds=s), gt, atol=1e-4)
  # Clipped to the image and the log-ratio clip at |log(16/1000)|: a huge dw gives
  # w = anchor_w * 1000 / 16 at most.
  anchor = np.array([[10.0, 10.0, 20.0, 30.0]], np.float32)
  big = box_ops.decode(anchor, np.array([[0.0, 0.0, 50.0, 0.0]], np.float32))
  np.testing.assert_allclose(big[0, 2] - big[0, 0], 10 * 1000 / 16, rtol=1e-5)
  clipped = box_ops.decode(anchor, np.array([[0.0, 0.0, 50.0, 50.0]], np.float32), (25, 40))
  np.testing.assert_allclose(clipped, [[0.0, 0.0, 40.0, 25.0]])


def _greedy_nms(boxes, scores, labels, threshold):
  """Textbook greedy NMS per class, in NumPy."""
  order = np.argsort(-scores, kind="stable")
  kept = []
  for i in order:
    if all(labels[k] != labels[i] or
           box_ops.iou_matrix(boxes[k:k + 1], boxes[i:i + 1])[0, 0] <= threshold for k in kept):
      kept.append(i)
  return np.array(kept)


def test_batched_nms_matches_greedy_reference_and_truncates():
  rng = np.random.default_rng(2)
  boxes = _boxes(rng, 300, extent=60.0)  # crowded: many overlaps
  scores = rng.permutation(300).astype(np.float32) / 300
  labels = rng.integers(0, 3, 300)
  valid = rng.random(300) < 0.9
  want = _greedy_nms(boxes[valid], scores[valid], labels[valid], 0.5)
  want = np.flatnonzero(valid)[want]
  kept, found = jax.jit(detection.batched_nms, static_argnums=(4, 5))(
      boxes, scores, labels, valid, 0.5, 300)
  assert int(found.sum()) == len(want) < 300
  np.testing.assert_array_equal(kept[:len(want)], want)
  kept10, found10 = detection.batched_nms(boxes, scores, labels, valid, 0.5, 10)
  assert found10.all()
  np.testing.assert_array_equal(kept10, want[:10])


def test_loss_groups_are_per_image_normalisations():
  """With one image per group the loss is the mean of the images' own losses."""
  rng = np.random.default_rng(3)
  sizes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
  cls = [jnp.asarray(rng.normal(-1, 1, (2, h, w, 9 * 3)), jnp.float32) for h, w in sizes]
  box = [jnp.asarray(rng.normal(0, 0.2, (2, h, w, 36)), jnp.float32) for h, w in sizes]
  batch = {"image_size": np.array([[32, 32], [30, 20]]),
           "boxes": np.array([[[2, 2, 20, 25], [8, 0, 30, 12]], [[3, 3, 15, 15], [0, 0, 0, 0]]],
                             np.float32),
           "labels": np.array([[0, 2], [1, 0]]), "box_mask": np.array([[1, 1], [1, 0]], bool)}
  loss = jax.jit(detection.loss, static_argnums=3)
  one = detection.RetinaNetSettings(images_per_group=1)
  grouped = loss(cls, box, batch, one)[0]
  alone = [loss([c[i:i + 1] for c in cls], [b[i:i + 1] for b in box],
                jax.tree.map(lambda x, i=i: x[i:i + 1], batch), one)[0] for i in range(2)]
  np.testing.assert_allclose(grouped, np.mean(alone), rtol=1e-6)
  whole = loss(cls, box, batch, detection.RetinaNetSettings())[1]
  assert whole["num_pos"] >= 3
  with pytest.raises(ValueError, match="groups of 3"):
    losses.normalise(jnp.ones(4), jnp.ones(4), 3)


def test_padding_rows_and_empty_images():
  rng = np.random.default_rng(4)
  anchors = np.asarray(detection.AnchorGenerator().level_anchors(0, (5, 5)))
  valid = np.ones(len(anchors), bool)
  valid[-9:] = False
  gt = _boxes(rng, 3, extent=30)
  assigner = detection.MaxIoUAssigner()
  plain = assigner.assign(anchors, valid, gt, np.ones(3, bool))
  padded = assigner.assign(anchors, valid, np.concatenate([gt, _boxes(rng, 4)]),
                           np.arange(7) < 3)
  np.testing.assert_array_equal(plain, padded)
  assert (plain[-9:] == -1).all() and (plain > 0).sum() >= 3
  empty = detection.anchor_targets(anchors, valid, gt, np.zeros(3, np.int32),
                                   np.zeros(3, bool), num_classes=5)
  assert int(empty["num_pos"]) == 0 and (np.asarray(empty["labels"]) == 5).all()
  np.testing.assert_array_equal(empty["label_weights"], valid.astype(np.float32))


@pytest.mark.torch
def test_against_torchvision():
  """Focal loss, IoU and class-wise NMS against torchvision.ops."""
  torch = pytest.importorskip("torch")
  ops = pytest.importorskip("torchvision.ops")
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 3, (2, 40, 6)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 40))  # 6 = background
  weights = (rng.random((2, 40)) < 0.8).astype(np.float32)
  targets = np.eye(7, dtype=np.float32)[labels][..., :6]
  want = ops.sigmoid_focal_loss(torch.from_numpy(logits), torch.from_numpy(targets),
                                alpha=0.25, gamma=2.0, reduction="none")
  want = (want * torch.from_numpy(weights)[..., None]).sum((1, 2)).numpy()
  np.testing.assert_allclose(losses.focal_loss(logits, labels, weights), want, rtol=1e-5)

  a, b = _boxes(rng, 30), _boxes(rng, 20)
  np.testing.assert_allclose(box_ops.iou_matrix(a, b),
                             ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                             rtol=1e-5, atol=1e-7)
  boxes = _boxes(rng, 500, extent=80.0)
  scores = rng.random(500).astype(np.float32)
  classes = rng.integers(0, 4, 500)
  want = ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                         torch.from_numpy(classes), 0.5).numpy()
  kept, found = detection.batched_nms(boxes, scores, classes, np.ones(500, bool), 0.5, 500)
  np.testing.assert_array_equal(kept[:int(found.sum())], want)


_SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pvt_jax import detection
rng = np.random.default_rng(0)
sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
cls = [rng.normal(-2, 1, (4, h, w, 27)).astype(np.float32) for h, w in sizes]
box = [rng.normal(0, 0.3, (4, h, w, 36)).astype(np.float32) for h, w in sizes]
batch = {"image_size": np.array([[64, 80], [50, 70], [64, 64], [33, 80]], np.int32),
         "boxes": np.tile(np.array([[[4, 4, 40, 30], [30, 10, 60, 50]]], np.float32), (4, 1, 1)),
         "labels": np.array([[0, 2]] * 4, np.int32),
         "box_mask": np.array([[1, 0], [1, 1]] * 2, bool)}
settings = detection.RetinaNetSettings(images_per_group=2)
def run(fn, *args):
  return jax.device_get(jax.jit(fn, static_argnums=len(args) - 1)(*args))
want_loss = run(detection.loss, cls, box, batch, settings)
want_det = run(detection.predict, cls, box, batch["image_size"], settings)
mesh = Mesh(np.array(jax.devices()), ("data",))
shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
cls, box, batch = jax.tree.map(shard, (cls, box, batch))
got_loss = run(detection.loss, cls, box, batch, settings)
got_det = run(detection.predict, cls, box, batch["image_size"], settings)
assert len(jax.devices()) == 2
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), want_loss, got_loss)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), want_det, got_det)
print("ok")
"""


def test_loss_and_detections_equal_on_one_and_two_devices():
  """Batch-sharded over 2 CPU devices (normaliser groups of 2 images): same loss, detections."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
